"""Batch-1 decode speed of a Llama-shaped model: transformers fp32 / bf16, squeezer's packed presets, the
streaming-read limit, and GGUF Q4_0 files (squeezer's codes vs llama.cpp's own rounding) with their error.

The model is a seeded random Llama folder (``squeezer.hf.testmodels``: ``--size 1b`` is TinyLlama's shapes,
``--size tiny`` a check that runs in seconds). Each row runs in a fresh subprocess (memory freed between
rows) with ``--threads`` threads and times ``--rounds`` generations of ``--tokens`` greedy tokens after a
``--prompt``-token prompt of seeded random ids, the KV cache kept (transformers' ``DynamicCache``):

* prompt tok/s = ``prompt / t(prefill)``; decode tok/s = ``(tokens - 1) / t(decode)`` (the first token comes
  from the prefill), medians over the rounds;
* ``bytes / token``: the weights one decode step reads: every parameter and buffer, a packed layer's codes +
  scales (``PackedWeight.nbytes``), less the input embedding table (one row of it is gathered);
* the streaming-read bandwidth ``B``: a ``torch.sum`` over a 512 MiB fp32 buffer (larger than any cache), median
  of 7, with the same threads, measured in each row's process before the rounds and after each; the row's limit is
  ``B / (bytes / token)`` tokens/s and ``% limit`` its decode tok/s over that limit;
* error vs fp32: relative RMS ``||L - L_fp32|| / ||L_fp32||`` of the prompt's logits ``(prompt, vocab)`` and of
  the next-token logits after the prompt ``(vocab,)``, and how many greedy tokens equal fp32's from the start.

The GGUF rows: ``squeezer.quantize_pretrained(folder, "q4_0", format="gguf")`` writes squeezer's codes
(``d = max|x| / 7``); llama.cpp's own Q4_0 file is the same file with every Q4_0 tensor re-rounded by
``gguf.quants.quantize`` (the reference ``quantize_row_q4_0``: ``d = x_max / -8``) from the folder's weights.
Their error vs fp32 logits: each file's Q4_0 tensors dequantized (``gguf.quants.dequantize``), Q / K rows put
back in Hugging Face's order, loaded into the fp32 model (the same logits as above, prompt + tokens long).
Their speed: each file run by llama.cpp (``squeezer.hf.llamacpp.LlamaCpp``, the build bundled in gpt4all) from
the same prompt ids, timed in the same process and rounds as the packed ``w4g128`` model (a seeded random order
per round, the streaming read measured after each round), so the goal's ratios come from the same conditions.
Their ``next-token logits err`` is llama.cpp's own logits after the prompt (it quantizes activations to Q8_0).

    python bench/decode.py --size 1b [--tokens 128 --prompt 32 --threads 2 --rounds 3] [--rows w4g128 fp32 ...]
    python bench/decode.py --size tiny --tokens 8 --rounds 1     # a quick check of the script
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, log, table_head, table_row, utc_now, write_json  # noqa: E402

WORK = Path("/tmp/squeezer-decode")
"""Where the model folder, the GGUF files and each row's logits go (``--work``)."""
GGUF_ROWS = ("gguf-squeezer", "gguf-llamacpp")
GROUPS = ("gguf-error", "w4g128", "fp32", "w8a8", "w8", "bf16")
"""Each group runs in its own subprocess: ``gguf-error`` writes both Q4_0 files and measures their error;
``w4g128`` times the packed model round-robin with both GGUF files in llama.cpp (when ``squeezer.hf.llamacpp``
is there), so the goal's ratios come from the same rounds; the others time one PyTorch model each."""
STREAM_MIB, STREAM_REPEATS = 512, 7
SEED = 0


# ---------------------------------------------------------------- measurements inside one row's process

def stream_bandwidth(threads: int) -> float:
    """Bytes / s of a ``torch.sum`` over a ``STREAM_MIB`` fp32 buffer with ``threads`` threads (median)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(STREAM_MIB * 2**20 // 4)
    buf.sum()
    times = []
    for _ in range(STREAM_REPEATS):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.nbytes / statistics.median(times)


def token_ids(vocab: int, n: int):
    """``n`` seeded random token ids in ``[3, vocab)`` (past the special ids)."""
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(SEED))


def decode_bytes(model) -> dict[str, int]:
    """``per_token``: bytes a decode step reads (module docstring); ``total``: with the input embedding."""
    import torch

    embedding = model.get_input_embeddings()
    total = per_token = 0
    for module in model.modules():
        own = sum(t.numel() * t.element_size() for t in (*module.parameters(recurse=False),
                                                         *module.buffers(recurse=False)) if isinstance(t, torch.Tensor))
        if getattr(module, "is_packed", False):
            own += module.runtime.weight.nbytes
        total += own
        per_token += 0 if module is embedding else own
    return {"per_token": per_token, "total": total}


def generate(model, prompt, tokens: int) -> dict[str, Any]:
    """Greedy generation with a KV cache: prefill and decode seconds, the ids, the prompt's logits."""
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        out = model(prompt.unsqueeze(0), use_cache=True)
        nxt = out.logits[0, -1].argmax()
        prefill = time.perf_counter()
        cache, logits, ids = out.past_key_values, out.logits[0].float(), [int(nxt)]
        for _ in range(tokens - 1):
            out = model(nxt.view(1, 1), cache=cache, use_cache=True)
            nxt = out.logits[0, -1].argmax()
            ids.append(int(nxt))
        end = time.perf_counter()
    return {"prefill_s": prefill - start, "decode_s": end - prefill, "ids": ids, "logits": logits}


def profile_step(model, prompt, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` operators of one decode step (after the prompt's prefill) by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        out = model(prompt.unsqueeze(0), use_cache=True)
        nxt, cache = out.logits[0, -1].argmax().view(1, 1), out.past_key_values
        model(nxt, cache=cache, use_cache=True)  # warm the single-row path
        cache.crop(-1)  # drop the warm-up step's token
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(nxt, cache=cache, use_cache=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def load_model(folder: Path, dtype: str):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


@dataclass
class Runner:
    """One row's model: ``generate(prompt ids, tokens)`` -> ``prefill_s``, ``decode_s``, ``ids`` and ``logits``
    ``(positions, vocab)`` whose last row is the next-token logits after the prompt; the bytes a decode step
    reads; the kernels of one-row products; the PyTorch model (None for llama.cpp)."""

    name: str
    generate: Callable[[list[int], int], dict[str, Any]]
    bytes: dict[str, int]
    kernels: list[str]
    model: Any = None


def torch_runner(name: str, folder: Path) -> Runner:
    """transformers in ``fp32`` / ``bf16``, or a squeezer preset quantized (no calibration) and packed."""
    import torch

    import squeezer

    model = load_model(folder, "bfloat16" if name == "bf16" else "float32")
    kernels: list[str] = []
    if name not in ("fp32", "bf16"):
        model = squeezer.quantize(model, name, inplace=True, progress=False)
        squeezer.pack(model, inplace=True)
        kernels = sorted({k for m in model.modules() if getattr(m, "is_packed", False)
                          and hasattr(m.runtime, "describe") for b, k in m.runtime.describe().items() if b == "m<=1"})
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)

    def run(prompt: list[int], tokens: int) -> dict[str, Any]:
        out = generate(model, torch.tensor(prompt), tokens)
        return {**out, "logits": out["logits"].numpy()}

    return Runner(name, run, decode_bytes(model), kernels, model)


def gguf_runner(row: str, path: Path, threads: int, n_ctx: int) -> Runner:
    """A Q4_0 GGUF file run by llama.cpp (:class:`squeezer.hf.llamacpp.LlamaCpp`); its logits: the next token's."""
    import gguf

    from squeezer.hf.llamacpp import LlamaCpp

    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    del reader
    llm = LlamaCpp(path, n_ctx=n_ctx, threads=threads)

    def run(prompt: list[int], tokens: int) -> dict[str, Any]:
        out = llm.generate(prompt, tokens)
        return {"prefill_s": out.prefill_s, "decode_s": out.decode_s, "ids": out.ids, "logits": out.logits[:1]}

    per_token = sum(n for name, n in sizes.items() if name != "token_embd.weight")
    return Runner(row, run, {"per_token": per_token, "total": sum(sizes.values())}, ["llama.cpp"])


def time_rows(runners: list[Runner], vocab: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Warm each runner up, then ``rounds`` rounds: every runner generates once (a seeded random order per round),
    then the streaming read is measured; one row per runner (bandwidth samples shared by the group)."""
    import numpy as np

    prompt = token_ids(vocab, args.prompt).tolist()
    for runner in runners:
        runner.generate(prompt, min(4, args.tokens))
    bandwidth = [stream_bandwidth(args.threads)]
    runs: dict[str, list[dict[str, Any]]] = {r.name: [] for r in runners}
    for k in range(args.rounds):
        for runner in random.Random(k).sample(runners, len(runners)):
            runs[runner.name].append(runner.generate(prompt, args.tokens))
        bandwidth.append(stream_bandwidth(args.threads))
    rows = []
    for runner in runners:
        last = runs[runner.name][-1]
        if runner.model is not None:
            np.save(WORK / f"logits-{runner.name}.npy", last["logits"])
        np.save(WORK / f"next-{runner.name}.npy", last["logits"][-1])
        row = {"row": runner.name, "bytes": runner.bytes, "kernels": runner.kernels, "stream_bytes_s": bandwidth,
               "ids": last["ids"], "group": [r.name for r in runners],
               "prefill_s": [r["prefill_s"] for r in runs[runner.name]],
               "decode_s": [r["decode_s"] for r in runs[runner.name]]}
        if runner.name in args.profile and runner.model is not None:
            row["profile"] = profile_step(runner.model, torch_ids(prompt))
        rows.append(row)
    return rows


def torch_ids(ids: list[int]):
    import torch

    return torch.tensor(ids)


# ---------------------------------------------------------------- the two Q4_0 GGUF files and their error

def gguf_paths(folder: Path) -> dict[str, Path]:
    return {row: WORK / f"{folder.name}.{row.split('-')[1]}-q4_0.gguf" for row in GGUF_ROWS}


class FolderTensors:
    """The folder's tensors by llama.cpp name (one ``HFFolder`` and one ``LlamaCppLayout``, shard headers read once):
    ``hf[name]`` the folder's name, :meth:`tensor` its fp32 values, :meth:`rows` llama.cpp's Q / K row order."""

    def __init__(self, folder: Path) -> None:
        from squeezer.hf.folder import HFFolder
        from squeezer.hf.gguf_file import LlamaCppLayout

        self.source = HFFolder.open(folder)
        self.layout = LlamaCppLayout(self.source)
        self.shard_of = {n: shard for shard in self.source.shards for n, _, _ in self.source.infos(shard)}
        self.hf = {self.layout.name(n): n for n in self.shard_of}

    def tensor(self, name: str):
        """The tensor of llama.cpp name ``name`` in fp32, in the folder's row order."""
        hf_name = self.hf[name]
        return self.source.tensor(self.shard_of[hf_name], hf_name).float()

    def rows(self, name: str, n: int):
        """llama.cpp's row order of the ``n`` rows of tensor ``name`` (None: the folder's order)."""
        return self.layout.rows(self.hf[name], n)


def write_ggufs(folder: Path) -> dict[str, Path]:
    """Squeezer's Q4_0 GGUF and llama.cpp's own Q4_0 GGUF of ``folder`` (kept under ``WORK`` once written)."""
    import gguf

    from squeezer.hf import gguf_file, quantize_pretrained

    paths = gguf_paths(folder)
    ours, theirs = paths["gguf-squeezer"], paths["gguf-llamacpp"]
    sources = [folder / "config.json", folder / "tokenizer.json", Path(gguf_file.__file__)]
    newest = max(p.stat().st_mtime for p in sources if p.exists())
    for path in paths.values():
        if path.exists() and path.stat().st_mtime < newest:  # written before the folder or the writer changed
            path.unlink()
    if not ours.exists():
        quantize_pretrained(folder, "q4_0", ours, format="gguf")
    if not theirs.exists():
        partial = theirs.with_name(theirs.name + ".partial")
        shutil.copyfile(ours, partial)
        reader = gguf.GGUFReader(partial, "r+")
        tensors = FolderTensors(folder)
        for tensor in reader.tensors:
            if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_0:
                continue
            weight = tensors.tensor(tensor.name)
            rows = tensors.rows(tensor.name, weight.shape[0])
            weight = weight if rows is None else weight[rows]
            tensor.data[...] = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q4_0)
        reader.data.flush()
        del reader
        partial.rename(theirs)
    return paths


def gguf_error_row(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both Q4_0 files written, then each one's logits error vs fp32 on ``prompt + tokens`` ids."""
    import gguf
    import torch

    torch.set_num_threads(args.threads)
    paths = write_ggufs(folder)
    tensors = FolderTensors(folder)
    model = load_model(folder, "float32")
    params = dict(model.named_parameters())
    ids = token_ids(model.config.vocab_size, args.prompt + args.tokens).unsqueeze(0)
    with torch.inference_mode():
        reference = model(ids).logits[0].float()
    out: dict[str, Any] = {"row": "gguf-error", "files": {}}
    for row, path in paths.items():
        reader = gguf.GGUFReader(path)
        for tensor in reader.tensors:
            if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_0:
                continue
            weight = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            rows = tensors.rows(tensor.name, weight.shape[0])
            target = params[tensors.hf[tensor.name]]
            with torch.no_grad():
                if rows is None:
                    target.copy_(weight)
                else:
                    target[rows] = weight
        del reader
        with torch.inference_mode():
            logits = model(ids).logits[0].float()
        out["files"][row] = {"path": str(path), "bytes": path.stat().st_size,
                             "logits_rel_rms": float((logits - reference).norm() / reference.norm()),
                             "top1_agree": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                             "kl": float(torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                                                    log_target=True, reduction="batchmean"))}
    return out


# ---------------------------------------------------------------- the run: one subprocess per row

def run_case(name: str, folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of group ``name`` (:data:`GROUPS`), measured in this process."""
    import torch

    torch.set_num_threads(args.threads)
    if name == "gguf-error":
        return [gguf_error_row(folder, args)]
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    paths = write_ggufs(folder) if name == "w4g128" and llamacpp_ready() else {}
    runners = [torch_runner(name, folder)]
    runners += [gguf_runner(row, path, args.threads, args.prompt + args.tokens + 8) for row, path in paths.items()]
    return time_rows(runners, vocab, args)


def llamacpp_ready() -> bool:
    """Whether squeezer runs GGUF files through llama.cpp here (``squeezer.hf.llamacpp`` and gpt4all)."""
    return all(importlib.util.find_spec(m) is not None for m in ("squeezer.hf.llamacpp", "gpt4all"))


def ensure_folder(args: argparse.Namespace) -> Path:
    """The model folder: ``--folder``, else a seeded fp16 Llama folder of ``--size`` under ``WORK`` with the
    byte-level BPE tokenizer (the vocabulary llama.cpp loads)."""
    if args.folder:
        return Path(args.folder)
    folder = WORK / f"llama-{args.size}"
    if not (folder / "config.json").exists():
        log(f"writing the {args.size} Llama folder {folder}")
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_models.py"), "--arch", "llama",
                        "--size", args.size, "--out", str(folder), "--dtype", "float16"], check=True)
    if json.loads((folder / "tokenizer.json").read_text())["model"]["type"] != "BPE":
        from squeezer.hf.testmodels import bpe_tokenizer

        bpe_tokenizer(json.loads((folder / "config.json").read_text())["vocab_size"]).save_pretrained(folder)
    return folder


def subprocess_rows(group: str, folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of ``group`` measured in a fresh subprocess (a failure: one row with its ``error``)."""
    cmd = [sys.executable, __file__, "--case", group, "--folder", str(folder), "--tokens", str(args.tokens),
           "--prompt", str(args.prompt), "--threads", str(args.threads), "--rounds", str(args.rounds),
           "--work", str(WORK), "--profile", *args.profile]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return [{"row": group, "error": lines[-1] if lines else f"exit {done.returncode}"}]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        row["wall_s"] = time.perf_counter() - start
    return rows


def relative_rms(logits, reference) -> float:
    """``||L - L_ref|| / ||L_ref||`` (Frobenius norms)."""
    import numpy as np

    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per-row figures (module docstring) and the goal checks, all from this run."""
    import numpy as np

    reference = WORK / "logits-fp32.npy"
    ref = np.load(reference) if reference.exists() else None
    ref_ids = next((r["ids"] for r in rows if r["row"] == "fp32" and "ids" in r), None)
    for r in rows:
        if "decode_s" not in r:
            continue
        r["prompt_tok_s"] = args.prompt / statistics.median(r["prefill_s"])
        r["decode_tok_s"] = (args.tokens - 1) / statistics.median(r["decode_s"])
        r["stream_gb_s"] = statistics.median(r["stream_bytes_s"]) / 1e9
        r["limit_tok_s"] = statistics.median(r["stream_bytes_s"]) / r["bytes"]["per_token"]
        r["of_limit"] = r["decode_tok_s"] / r["limit_tok_s"]
        path = WORK / f"logits-{r['row']}.npy"
        if ref is not None and path.exists() and r["row"] != "fp32":
            r["logits_rel_rms"] = relative_rms(np.load(path), ref)
        nxt = WORK / f"next-{r['row']}.npy"
        if ref is not None and nxt.exists() and r["row"] != "fp32":
            r["next_rel_rms"] = relative_rms(np.load(nxt), ref[-1])
        if ref_ids is not None:
            r["same_ids"] = next((i for i, (a, b) in enumerate(zip(r["ids"], ref_ids)) if a != b), len(ref_ids))
    by = {r["row"]: r for r in rows}
    goals: dict[str, Any] = {}
    w4, ours, theirs = by.get("w4g128", {}), by.get("gguf-squeezer", {}), by.get("gguf-llamacpp", {})
    if "of_limit" in w4:
        goals["w4g128 decode >= 70% of the streaming-read limit"] = {"ratio": w4["of_limit"],
                                                                     "met": w4["of_limit"] >= 0.7}
    if "decode_tok_s" in w4 and "decode_tok_s" in theirs:
        ratio = w4["decode_tok_s"] / theirs["decode_tok_s"]
        goals["w4g128 decode >= llama.cpp Q4_0 decode"] = {"ratio": ratio, "met": ratio >= 1.0}
    if "decode_tok_s" in ours and "decode_tok_s" in theirs:
        ratio = ours["decode_tok_s"] / theirs["decode_tok_s"]
        goals["squeezer-code GGUF as fast as llama.cpp Q4_0"] = {"ratio": ratio, "met": ratio >= 0.95}
    err = by.get("gguf-error", {}).get("files", {})
    if len(err) == 2:
        ratio = err["gguf-squeezer"]["logits_rel_rms"] / err["gguf-llamacpp"]["logits_rel_rms"]
        goals["squeezer-code GGUF error < llama.cpp Q4_0 error"] = {"ratio": ratio, "met": ratio < 1.0}
    return goals


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["row", "MB / token", "kernels (1 row)", "prompt tok/s", "decode tok/s", "stream GB/s", "limit tok/s",
            "% limit", "prompt logits err", "next-token logits err", "greedy = fp32"]
    lines = table_head(head)
    for r in rows:
        if "error" in r:
            lines.append(table_row([r["row"], f"failed: {r['error'][:120]}", *[""] * (len(head) - 2)]))
            continue
        if r["row"] == "gguf-error":
            for name, f in r["files"].items():
                lines.append(table_row([f"{name} (dequantized in PyTorch)", f"{f['bytes'] / 1e6:.0f} (file)", "", "",
                                        "", "", "", "", f"{f['logits_rel_rms']:.4f} (top-1 {f['top1_agree']:.3f}, "
                                        f"KL {f['kl']:.4f}; prompt + tokens positions)", "", ""]))
            continue
        one_row = r.get("kernels") or ["—"]
        err, nxt = r.get("logits_rel_rms"), r.get("next_rel_rms")
        lines.append(table_row([r["row"], f"{r['bytes']['per_token'] / 1e6:.0f}", ", ".join(one_row),
                                f"{r['prompt_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}", f"{r['stream_gb_s']:.1f}",
                                f"{r['limit_tok_s']:.2f}", f"{100 * r['of_limit']:.0f} %",
                                "—" if err is None else f"{err:.4f}", "—" if nxt is None else f"{nxt:.4f}",
                                str(r.get("same_ids", "—"))]))
    return lines


def main() -> None:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small", "1b"), default="1b")
    parser.add_argument("--folder", help="a Llama folder to use instead of the seeded one of --size")
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens generated")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length (random token ids)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed generations per row")
    parser.add_argument("--rows", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="row groups, each in its own subprocess (w4g128 includes the llama.cpp GGUF rows)")
    parser.add_argument("--profile", nargs="*", default=["w4g128"], help="rows whose decode step is profiled")
    parser.add_argument("--label", help="results file bench/results/decode_<label>.json (default: the size)")
    parser.add_argument("--work", default=str(WORK), help="folder of the model, the GGUF files and the logits")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    WORK = Path(args.work)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.folder), args)))
        return
    from machine import loadavg, machine_record, versions

    folder = ensure_folder(args)
    if not llamacpp_ready():
        log("squeezer.hf.llamacpp or gpt4all is missing: the llama.cpp speed rows are left out")
    record = machine_record(versions("torch", "transformers", "numpy", distributions={"gguf": "gguf", "gpt4all": "gpt4all"}),
                            threads=args.threads,
                            tokens=args.tokens, prompt=args.prompt, rounds=args.rounds, folder=str(folder),
                            command=" ".join(["python", "bench/decode.py", *sys.argv[1:]]))
    rows: list[dict[str, Any]] = []
    out = RESULTS / f"decode_{args.label or args.size}.json"
    for group in args.rows:
        log(f"rows {group} (load {loadavg()})")
        rows += subprocess_rows(group, folder, args)
        if "error" in rows[-1]:
            log(f"  {group} failed: {rows[-1]['error']}")
        write_json(out, {"when": utc_now(), "machine": record, "rows": rows, "partial": True})
    goals = summarize(rows, args)
    lines = table(rows)
    print("\n".join(lines))
    for goal, g in goals.items():
        print(f"{goal}: ratio {g['ratio']:.3f} -> {'met' if g['met'] else 'NOT met'}")
    for r in rows:
        for p in r.get("profile", []):
            print(f"  profile {r['row']}: {p['share'] * 100:5.1f} %  {p['self_ms']:8.2f} ms  {p['calls']:4d}  {p['op']}")
    record["loadavg_end"] = loadavg()
    write_json(out, {"when": utc_now(), "machine": record, "rows": rows, "goals": goals})


if __name__ == "__main__":
    main()
