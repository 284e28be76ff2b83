"""The paths of a model: fp32 in every runtime and squeezer's int8 configs (quantize, then pack or export)."""

from __future__ import annotations

import copy
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import squeezer
from common import log, short_error, state_dict_bytes
from deployment.guards import quiet, time_limit
from deployment.runtimes import EVAL_THREADS, FORMAT_SUFFIX, RUNTIMES, onnx_runner, pte_runner, tflite_runner, torch_runner
from deployment.tasks import Task

BUILD_LIMIT_S = {"minilm": 900}  # per path; others 300


# how each runtime carries a squeezer config (from the exporters' docs): exact / nearest / not carried
CARRIES = {
    ("ONNX Runtime", "w8a8"): "exact (MatMulInteger, squeezer's per-token int8)",
    ("ONNX Runtime", "w8a8-static"): "QDQ on squeezer's grids (~1e-4)",
    ("ONNX Runtime", "w8"): "MatMulNBits accuracy_level 4 (ORT also quantizes activations)",
    ("TFLite", "w8a8"): "exact for Linear (hybrid kernels = per-row int8)",
    ("TFLite", "w8a8-static"): "full integer on squeezer's grids (layers without one: float op)",
    ("TFLite", "w8"): "weights exact, TFLite also quantizes activations",
    ("ExecuTorch", "w8a8"): "nearest (XNNPACK asymmetric per-row int8)",
    ("ExecuTorch", "w8a8-static"): "exact-ish (XNNPACK int8 / portable q-dq)",
    ("ExecuTorch", "w8"): "weights exact, XNNPACK also quantizes activations (weight_only='dynamic')",
}


@dataclass
class DPath:
    name: str
    runtime: str
    family: str                     # fp32 / squeezer / peer
    config: str
    make: Callable[[int], Callable[..., Any]] | None = None    # threads -> runner(*inputs)
    wants: str = "numpy"           # input form: numpy / torch
    timed: bool = True
    file: str | None = None
    size_bytes: int | None = None
    size_what: str = ""
    warnings: list[str] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)
    note: str = ""
    error: str | None = None
    build_s: float = 0.0
    carries: str = ""
    default_peer: bool = False
    payload_bytes: tuple[int, int] | None = None  # squeezer's report: parameter bytes before, and after quantizing

    @property
    def key(self) -> str:
        return f"{self.name} | {self.runtime}"


def where(exc: BaseException) -> str:
    """`` (raised under squeezer/<file>:<line> <function>)``: the deepest frame of squeezer's own code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/squeezer/" in f.filename.replace(os.sep, "/")]
    if not frames or isinstance(exc, squeezer.ConfigError):
        return ""
    f = frames[-1]
    return f" (raised under squeezer/{f.filename.replace(os.sep, '/').rsplit('/squeezer/', 1)[1]}:{f.lineno} {f.name})"


def build(path: DPath, fn: Callable[[DPath], None], limit_s: float) -> DPath:
    start = time.perf_counter()
    try:
        with time_limit(limit_s), quiet():
            fn(path)
    except Exception as exc:  # noqa: BLE001 - any failure is reported with the path
        path.error = short_error(exc) + where(exc)
        path.make = None
        tb = traceback.format_exc().strip().splitlines()
        log(f"  {path.key}: FAILED {path.error}")
        if tb:
            log("    " + tb[-1][:300])
    path.build_s = time.perf_counter() - start
    if path.error is None:
        log(f"  {path.key}: built in {path.build_s:.1f}s" + (f" ({len(path.warnings)} export warnings)" if path.warnings else ""))
    return path


def export_file(model: nn.Module, task: Task, runtime: str, file: Path, p: DPath) -> None:
    options: dict[str, Any] = {}
    if runtime == "TFLite":  # scores and embeddings: layers squeezer leaves unquantized stay float ops
        options["calib"], options["unquantized_outputs"] = task.calib, "float"
    if runtime == "ExecuTorch":
        options["max_batch"] = 1
    report = squeezer.export(model, task.example, file, **options)
    p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, f"{FORMAT_SUFFIX[runtime]} file"
    p.warnings, p.layers = list(report.warnings), dict(report.layers)


def set_runner(p: DPath, runtime: str, file: Path, xnnpack: bool = False) -> None:
    if runtime == "ONNX Runtime":
        p.make = onnx_runner(file)
    elif runtime == "TFLite":
        p.make = tflite_runner(file, xnnpack)
    else:
        p.make = pte_runner(file)
    p.make(EVAL_THREADS)  # load once: a file the runtime refuses fails here


def fp32_paths(task: Task, work: Path, limit: float) -> list[DPath]:
    def torch_fp32(p: DPath) -> None:
        p.make, p.wants = torch_runner(task.model), "torch"
        p.size_bytes, p.size_what = state_dict_bytes(task.model), "torch.save(state_dict)"

    out = [build(DPath("torch fp32", "PyTorch", "fp32", "fp32"), torch_fp32, limit)]
    for runtime in RUNTIMES[1:]:
        file = work / f"fp32{FORMAT_SUFFIX[runtime]}"

        def fn(p: DPath, runtime: str = runtime, file: Path = file) -> None:
            export_file(task.model, task, runtime, file, p)
            set_runner(p, runtime, file, xnnpack=True)
        name = "fp32 (XNNPACK delegate)" if runtime == "TFLite" else "fp32"
        out.append(build(DPath(name, runtime, "fp32", "fp32"), fn, limit))
    return out


def squeezer_paths(task: Task, work: Path, limit: float) -> list[DPath]:
    """Per config: quantize once, export to each runtime that takes it, then pack for PyTorch."""
    out: list[DPath] = []
    for label, spec in task.configs.items():
        state: dict[str, Any] = {}
        log(f"  squeezer {label}: quantize")
        try:
            with time_limit(limit), quiet():
                start = time.perf_counter()
                state["q"] = squeezer.quantize(task.model, spec["config"], calib=task.calib, progress=False)
                state["quantize_s"] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001
            err = short_error(exc)
            log(f"  squeezer {label}: quantize FAILED {err}")
            for runtime in spec["runtimes"]:
                out.append(DPath(f"squeezer {label}", runtime, "squeezer", label, error=f"quantize: {err}"))
            continue
        q = state["q"]
        report = squeezer.report_of(q)
        for runtime in spec["runtimes"]:
            if runtime == "PyTorch":
                continue
            file = work / f"squeezer_{label}{FORMAT_SUFFIX[runtime]}"
            variants = [(False, " (builtin kernels)"), (True, " (XNNPACK delegate)")] if runtime == "TFLite" else [(False, "")]
            first: DPath | None = None
            for xnnpack, suffix in variants:
                p = DPath(f"squeezer {label}{suffix}", runtime, "squeezer", label, timed=True,
                          carries=CARRIES.get((runtime, label), ""), payload_bytes=(report.model_bytes_before, report.model_bytes_after))
                if first is None:
                    first = build(p, lambda p, runtime=runtime, file=file, x=xnnpack: (
                        export_file(q, task, runtime, file, p), set_runner(p, runtime, file, x)), limit)
                    out.append(first)
                else:  # the same file, another resolver
                    if first.error:
                        p.error = first.error
                        out.append(p)
                        continue
                    p.file, p.size_bytes, p.size_what = first.file, first.size_bytes, first.size_what
                    p.warnings, p.layers = first.warnings, first.layers
                    out.append(build(p, lambda p, file=file, x=xnnpack: set_runner(p, "TFLite", file, x), limit))
        if "PyTorch" in spec["runtimes"]:
            def simulated(p: DPath) -> None:
                p.make, p.wants = torch_runner(copy.deepcopy(q).eval()), "torch"
                p.note = "squeezer.quantize's model before pack (fake-quantized float arithmetic): accuracy reference only"
            out.append(build(DPath(f"squeezer {label} (simulated)", "PyTorch", "squeezer-sim", label, timed=False),
                             simulated, limit))

            def packed(p: DPath) -> None:
                ckpt = squeezer.save(q, work / f"squeezer_{label}")
                rows = squeezer.report_of(squeezer.pack(q, inplace=True)).layers
                q.eval()
                p.make, p.wants = torch_runner(q), "torch"
                p.size_bytes, p.size_what = (ckpt / "model.safetensors").stat().st_size, "squeezer.save model.safetensors"
                kernels = sorted({k for r in rows for k in r.kernels.values()})
                warns = sorted({r.warning for r in rows if r.warning})
                p.note = (f"quantize {state['quantize_s']:.2f}s; kernels: {', '.join(kernels) or '—'}"
                          + (f"; pack warnings: {'; '.join(warns)}" if warns else ""))
            out.append(build(DPath(f"squeezer {label} (packed)", "PyTorch", "squeezer", label, timed=spec["timed"],
                                   carries="squeezer's own kernels"), packed, limit))
    return out
