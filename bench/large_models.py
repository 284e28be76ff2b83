"""Quantization of model folders larger than memory: wall time, peak resident memory, output size, verification.

For a Hugging Face folder and a list of ``preset:format`` runs, each quantization runs in a fresh subprocess
(``squeezer.quantize_pretrained``) while this process watches it:

* ``wall_s``: the subprocess's wall time (interpreter start and imports included), ``quantize_s`` the call alone,
  ``cpu_s`` its user + system CPU seconds (on a shared machine the wall time also holds the waits for a core);
* ``peak_rss``: the subprocess's high-water mark (``ru_maxrss`` of ``os.wait4``); ``peak_anon`` / ``peak_file``:
  the highest anonymous (heap) and file-backed (memory-mapped shards) parts of ``/proc/<pid>/status`` seen by a
  sampler every 0.2 s, which tell what the peak holds;
* ``out_bytes``: the output file or folder;
* calibrated runs: ``block_done_s`` (when each block's output shard appeared, seconds after the start: block
  ``i`` is quantized and its forward done; ``block_done_cpu_s`` the CPU seconds used by then) and ``per_block_s``
  (median gap between consecutive blocks, each gap = write one block, read the next, quantize it, run its forward);
* verification of the output, in this process, on a few tensors:
  GGUF (``gguf.GGUFReader``): tensor count and types against the source; quantized tensors' bytes equal to
  squeezer's Q4_0 / Q8_0 blocks of the source weight (Q / K rows in llama.cpp's order), dequantized values
  within half a step ``d / 2`` of the source; kept tensors equal to the source as F32.
  compressed-tensors: ``config.json``'s ``quantization_config`` parsed by compressed-tensors'
  ``QuantizationConfig`` and by transformers' ``CompressedTensorsConfig``; the targets are the quantized weights;
  a few modules decompressed by the library's compressor: round-to-nearest presets equal squeezer's
  dequantized weights exactly and lie within ``S / 2`` of the source; calibrated presets lie on their grid
  (``w / S + Z`` integers in the code range) with their relative error beside round-to-nearest's.
* ``--load-check``: a further subprocess loads the compressed-tensors output with
  ``AutoModelForCausalLM.from_pretrained`` (weights kept compressed, the default) and reports its peak memory.

``--max-blocks N`` quantizes the first ``N`` blocks only, through a view of the folder (its config with
``num_hidden_layers = N``, links to the same shards); the full run's time is then estimated as
``block_done_s[0] + (L - 1) * per_block_s + finish_s`` (``finish_s``: last block written, tensors outside the
blocks and config after it) and reported as an estimate.

    python bench/large_models.py --folder /work/big/llama-13b --run q4_0:gguf --run w4g128:compressed-tensors
    python bench/large_models.py --folder /work/big/llama-7b --run w4g128-gptq:compressed-tensors \\
        --calib 16x256 --max-blocks 2 --label 7b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS, log, table_head, table_row, write_json  # noqa: E402
from machine import loadavg, machine_record, versions  # noqa: E402

GB = 1e9
SAMPLE_S = 0.2


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (``/proc/<pid>/stat``), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(pid: int) -> dict[str, int]:
    """``VmRSS`` / ``RssAnon`` / ``RssFile`` of process ``pid`` in bytes (empty once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class Watch(threading.Thread):
    """Samples a subprocess's resident memory and the block shards appearing under ``out``'s temporary folder."""

    def __init__(self, pid: int, out: Path, start: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.out, self.start_time = pid, out, start
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.blocks: dict[int, float] = {}
        self.block_cpu: dict[int, float | None] = {}
        self.done = threading.Event()

    def run(self) -> None:
        pattern = re.compile(r"model-block-(\d+)\.safetensors")
        while not self.done.is_set():
            for key, value in _status(self.pid).items():
                self.peak[key] = max(self.peak[key], value)
            for tmp in self.out.parent.glob(f".{self.out.name}.tmp-*"):
                for f in tmp.iterdir() if tmp.is_dir() else ():
                    m = pattern.match(f.name)
                    if m and int(m.group(1)) not in self.blocks:
                        self.blocks[int(m.group(1))] = time.perf_counter() - self.start_time
                        self.block_cpu[int(m.group(1))] = _cpu_s(self.pid)
            self.done.wait(SAMPLE_S)


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_child(spec: dict, out: Path) -> dict:
    """Run ``python large_models.py --child SPEC`` and watch it; its JSON line plus the measurements."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            env=_child_env(), text=True)
    watch = Watch(proc.pid, out, start)
    watch.start()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    watch.done.set()
    watch.join()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    record = json.loads(lines[-1]) if lines else {"error": f"exit code {proc.returncode}, no result line"}
    record.update(wall_s=round(wall, 1), exit_code=proc.returncode, peak_rss=usage.ru_maxrss * 1024,
                  peak_anon=watch.peak["RssAnon"], peak_file=watch.peak["RssFile"],
                  cpu_s=round(usage.ru_utime + usage.ru_stime, 1))
    if watch.blocks:
        done = [watch.blocks[i] for i in sorted(watch.blocks)]
        record["block_done_s"] = [round(t, 1) for t in done]
        record["block_done_cpu_s"] = [watch.block_cpu[i] for i in sorted(watch.blocks)]
        record["finish_s"] = round(wall - done[-1], 1)
        if len(done) > 1:
            record["per_block_s"] = round(statistics.median(b - a for a, b in zip(done, done[1:])), 1)
    return record


def child(spec: dict) -> None:
    """In the subprocess: one quantization (``spec``: folder, preset, format, out, calib ``[n, length]``, seed)
    or, with ``spec["load"]``, one ``from_pretrained`` of a compressed-tensors folder; prints a JSON line."""
    if spec.get("load") or spec.get("llamacpp"):
        start = time.perf_counter()
        try:
            result = _load_transformers(spec["load"]) if spec.get("load") else _load_llamacpp(spec["llamacpp"])
        except Exception as exc:  # noqa: BLE001 - a refusal is the result to record
            result = {"error": re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}")[:600]}
        print(json.dumps({"load_s": round(time.perf_counter() - start, 1), **result}), flush=True)
        return
    from squeezer.hf import quantize_pretrained

    calib = None
    if spec.get("calib"):
        n, length = spec["calib"]
        vocab = json.loads((Path(spec["folder"]) / "config.json").read_text())["vocab_size"]
        rng = np.random.default_rng(spec.get("seed", 0))
        calib = [rng.integers(0, vocab, size=(1, length), dtype=np.int64) for _ in range(n)]
    start = time.perf_counter()
    result = quantize_pretrained(spec["folder"], spec["preset"], spec["out"], format=spec["format"], calib=calib)
    print(json.dumps({"quantize_s": round(time.perf_counter() - start, 1), "quantized": len(result.quantized),
                      "kept": len(result.kept), "spilled": result.spilled,
                      "peak_live_blocks": result.peak_live_blocks}), flush=True)


def _load_transformers(folder: str) -> dict:
    """``AutoModelForCausalLM.from_pretrained`` of a compressed-tensors folder (weights left compressed)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return {"class": type(model).__name__, "packed_modules": sum(hasattr(m, "weight_packed") for m in model.modules()),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def _load_llamacpp(path: str) -> dict:
    """llama.cpp (:class:`squeezer.hf.llamacpp.LlamaCpp`) loads the GGUF file and greedily generates 2 tokens."""
    from squeezer.hf.llamacpp import LlamaCpp

    with LlamaCpp(path, n_ctx=64, threads=2) as model:
        out = model.generate([1, 2, 3, 4], 2)
        return {"vocab": model.vocab, "generated": [int(i) for i in out.ids],
                "finite_logits": bool(np.isfinite(out.logits).all()), "prefill_s": round(out.prefill_s, 2),
                "decode_s": round(out.decode_s, 2)}


def view_of_first_blocks(folder: Path, n: int, where: Path) -> Path:
    """A folder that reads as ``folder`` cut after block ``n``: config with ``num_hidden_layers = n``, the same
    shards and tokenizer files linked (the later blocks' tensors lie in the shards, unread)."""
    where.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = n
    (where / "config.json").write_text(json.dumps(config, indent=2))
    for f in folder.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json") and not (where / f.name).exists():
            (where / f.name).symlink_to(f.resolve())
    return where


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _source_tensors(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), shard))
    return where


def _read(shard: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as handle:
        return handle.get_tensor(name)


def _sample_names(names: list[str], blocks: int) -> list[str]:
    """A few quantized weights: block 0's Q and K, the middle block's gate, the last block's down."""
    wanted = [".layers.0.self_attn.q_proj.", ".layers.0.self_attn.k_proj.", f".layers.{blocks // 2}.mlp.gate_proj.",
              f".layers.{blocks - 1}.mlp.down_proj."]
    return [next(n for n in names if w in n) for w in wanted if any(w in n for n in names)]


def verify_gguf(out: Path, folder: Path, preset: str) -> dict:
    """Read ``out`` back with ``gguf.GGUFReader`` and compare a few tensors with the source (see module)."""
    import gguf
    import torch

    from squeezer.hf.folder import HFFolder
    from squeezer.hf.gguf_file import LlamaCppLayout, blocks, gguf_type
    from squeezer.hf.weights import quantize_weight
    from squeezer.resolve import resolve_config

    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    source = HFFolder.open(folder)
    layout = LlamaCppLayout(source)
    where = _source_tensors(folder)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    cfg = resolve_config(preset)
    qtype = gguf_type(cfg)
    quantized = [n for n in where if tensors[layout.name(n)].tensor_type.name == qtype]
    checks, worst = [], 0.0
    for name in _sample_names(quantized, layout.blocks):
        t = tensors[layout.name(name)]
        w = _read(where[name], name)
        qt = quantize_weight(name, w, cfg.weight, torch.float16)
        rows = layout.rows(name, w.shape[0])
        expected = blocks(qt, qtype)
        expected = expected if rows is None else expected[rows.numpy()]
        same_bytes = bool(np.array_equal(np.asarray(t.data).reshape(-1), expected.reshape(-1)))
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape)
        ref = w.float() if rows is None else w.float()[rows]
        step = qt.qparams.scale.reshape(w.shape[0], -1)
        step = (step if rows is None else step[rows]).repeat_interleave(32, dim=1)
        ratio = float(((values - ref).abs() / (step / 2)).max())
        worst = max(worst, ratio)
        checks.append({"tensor": t.name, "type": t.tensor_type.name, "same_bytes_as_squeezer": same_bytes,
                       "max_err_over_half_step": round(ratio, 4)})
        del w, qt, values, ref, step
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        t = tensors[layout.name(name)]
        source_values = _read(where[name], name).float().numpy().reshape(-1)
        same = bool(np.array_equal(np.asarray(t.data).reshape(-1), source_values))
        checks.append({"tensor": t.name, "type": t.tensor_type.name, "equal_to_source": same})
    ok = (len(tensors) == len(where) and all(c.get("same_bytes_as_squeezer", c.get("equal_to_source")) for c in checks)
          and worst <= 1.0 + 1e-3)
    return {"ok": ok, "tensors": len(tensors), "source_tensors": len(where), "types": types,
            "quantized": len(quantized), "checks": checks}


def _decompress(out: Path, module: str, scheme, compressor):
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    local = {k.removeprefix(module + "."): _read(out / shard, k) for k, shard in index.items()
             if k.startswith(module + ".")}
    return compressor.decompress(local, scheme)  # weight, scale, zero point unpacked


def verify_compressed(out: Path, folder: Path, preset: str, calibrated: bool) -> dict:
    """Parse ``out``'s ``quantization_config`` with compressed-tensors and transformers, decompress a few modules
    with the library and compare them with the source (see module)."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from squeezer.hf.weights import quantize_weight
    from squeezer.quant.core import compute_qparams, dequantize, quantize
    from squeezer.resolve import resolve_config

    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    qconfig = QuantizationConfig.model_validate(raw)
    hf_config = AutoConfig.from_pretrained(str(out)).quantization_config
    hf_qc = CompressedTensorsConfig.from_dict(hf_config if isinstance(hf_config, dict) else hf_config.to_dict())
    scheme = qconfig.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    where = _source_tensors(folder)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    spec = resolve_config(preset).weight
    checks = []
    for name in _sample_names([t + ".weight" for t in scheme.targets], layers):
        module = name.removesuffix(".weight")
        local = _decompress(out, module, scheme, compressor)
        w_hat = local["weight"].float()
        w = _read(where[name], name).float()
        scale = local["weight_scale"].float()
        step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
        check = {"module": module, "rel_err": round(float((w_hat - w).norm() / w.norm()), 5)}
        if calibrated:
            half = 2 ** (spec.bits - 1)
            codes = w_hat / step
            if "weight_zero_point" in local:  # signed zero point Z - 2^(b-1): codes back in [0, 2^b - 1]
                zero = local["weight_zero_point"].float().repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
                codes = codes + zero + half
            low, high = (0, 2 * half - 1) if "weight_zero_point" in local else (-half, half - 1)
            check["on_grid"] = bool((codes - codes.round()).abs().max() < 1e-2 and codes.min() > low - 0.5
                                    and codes.max() < high + 0.5)
            rtn = dequantize(quantize(w, spec, compute_qparams(w, spec)))
            check["rtn_rel_err"] = round(float((rtn - w).norm() / w.norm()), 5)
        else:
            stored = _read(where[name], name)  # scales are kept in the source dtype (fp32 for fp64)
            qt = quantize_weight(name, stored, spec, torch.float32 if stored.dtype == torch.float64 else stored.dtype)
            check["equal_to_squeezer"] = bool(torch.equal(w_hat, dequantize(qt)))
            check["max_err_over_half_step"] = round(float(((w_hat - w).abs() / (step / 2)).max()), 4)
        checks.append(check)
    kept = "model.embed_tokens.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    checks.append({"tensor": kept, "equal_to_source": bool(torch.equal(_read(out / index[kept], kept),
                                                                       _read(where[kept], kept)))})
    ok = (qconfig.quantization_status == "compressed" and hf_qc.quant_method == "compressed-tensors"
          and all(c.get("on_grid", c.get("equal_to_squeezer", c.get("equal_to_source"))) for c in checks)
          and all(c.get("max_err_over_half_step", 0) <= 1.0 + 1e-3 for c in checks))
    return {"ok": ok, "format": qconfig.format, "status": str(qconfig.quantization_status),
            "transformers_quant_method": hf_qc.quant_method, "targets": len(scheme.targets), "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help="the Hugging Face folder (bench/make_models.py --size 13b)")
    parser.add_argument("--run", action="append", default=[], metavar="PRESET:FORMAT",
                        help="one quantization, e.g. q4_0:gguf or w4g128:compressed-tensors (repeatable)")
    parser.add_argument("--calib", help="NxT: N random token sequences of T tokens (calibrated, block by block)")
    parser.add_argument("--max-blocks", type=int, help="quantize the first N blocks only and estimate the rest")
    parser.add_argument("--work", type=Path, default=Path("/tmp/squeezer-large"),
                        help="where outputs go (each deleted after its verification)")
    parser.add_argument("--load-check", action="store_true",
                        help="also load each compressed-tensors output with transformers in a subprocess")
    parser.add_argument("--llamacpp-check", action="store_true",
                        help="also load each GGUF output in llama.cpp (gpt4all's build) and generate 2 tokens")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    parser.add_argument("--label", default="", help="suffix of bench/results/large_models_<label>.json")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    folder = args.folder.resolve()
    config = json.loads((folder / "config.json").read_text())
    layers = config["num_hidden_layers"]
    source_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    calib = [int(v) for v in args.calib.lower().split("x")] if args.calib else None
    args.work.mkdir(parents=True, exist_ok=True)
    target = folder
    if args.max_blocks:
        target = view_of_first_blocks(folder, args.max_blocks, args.work / f"{folder.name}-first{args.max_blocks}")
    import torch

    record = {"machine": machine_record(versions("torch", "transformers", distributions={
        "gguf": "gguf", "compressed_tensors": "compressed-tensors"}), torch_threads=torch.get_num_threads()),
        "folder": str(folder), "source_bytes": source_bytes, "blocks": layers, "max_blocks": args.max_blocks,
        "calib": calib, "runs": []}
    for item in args.run:
        preset, fmt = item.split(":")
        out = args.work / (f"{folder.name}-{preset}.gguf" if fmt == "gguf" else f"{folder.name}-{preset}-ct")
        log(f"{preset} -> {fmt}: {target} -> {out} (load {loadavg()})")
        run = {"preset": preset, "format": fmt, "loadavg_start": loadavg()}
        run.update(run_child({"folder": str(target), "preset": preset, "format": fmt, "out": str(out),
                              "calib": calib}, out))
        run["loadavg_end"] = loadavg()
        if out.exists():
            run["out_bytes"] = _size(out)
            log(f"  {run['wall_s']} s, peak {run['peak_rss'] / GB:.2f} GB; verifying")
            try:
                run["verify"] = (verify_gguf(out, target, preset) if fmt == "gguf"
                                 else verify_compressed(out, target, preset, calib is not None))
            except Exception as exc:  # noqa: BLE001 - a failed verification is a result to record
                run["verify"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if args.load_check and fmt == "compressed-tensors":
                log("  loading it with transformers")
                run["load"] = run_child({"load": str(out)}, out)
            if args.llamacpp_check and fmt == "gguf":
                log("  loading it in llama.cpp")
                run["load"] = run_child({"llamacpp": str(out)}, out)
            if not args.keep:
                shutil.rmtree(out) if out.is_dir() else out.unlink()
        if args.max_blocks and "per_block_s" in run:
            run["estimate_full_s"] = round(run["block_done_s"][0] + (layers - 1) * run["per_block_s"]
                                           + run["finish_s"], 0)
        record["runs"].append(run)
        write_json(RESULTS / f"large_models{'_' + args.label if args.label else ''}.json", record)
    if args.max_blocks and not args.keep:
        shutil.rmtree(target)
    print(render(record))


def render(record: dict) -> str:
    """The runs as a Markdown table."""
    head = ["preset", "format", "blocks run", "wall s", "CPU s", "per block s", "est. full s", "peak RSS GB",
            "anon / file GB", "out GB", "verified"]
    lines = table_head(head)
    for r in record["runs"]:
        v = r.get("verify", {})
        lines.append(table_row([
            r["preset"], r["format"], str(record["max_blocks"] or record["blocks"]), f"{r['wall_s']:.0f}",
            str(r.get("cpu_s", "—")), str(r.get("per_block_s", "—")), str(r.get("estimate_full_s", "—")),
            f"{r['peak_rss'] / GB:.2f}",
            f"{r['peak_anon'] / GB:.2f} / {r['peak_file'] / GB:.2f}", f"{r.get('out_bytes', 0) / GB:.2f}",
            "yes" if v.get("ok") else f"no output (exit code {r['exit_code']})" if r["exit_code"]
            else f"NO {v.get('error', '')}"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
