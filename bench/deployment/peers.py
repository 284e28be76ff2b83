"""The peers: each runtime's own int8 quantization of the same fp32 model (torch.ao, ONNX Runtime, LiteRT's
PT2E quantizer, ExecuTorch's XNNPACKQuantizer)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common import short_error, state_dict_bytes
from deployment.paths import DPath, build, set_runner
from deployment.runtimes import torch_runner
from deployment.tasks import Task
from ort_tools import calibration_reader, ort_preprocess


def numpy_feeds(batches: list[tuple], names: list[str]) -> list[dict[str, np.ndarray]]:
    """Each batch of torch tensors as an ONNX Runtime feed: ``{input name: array}``."""
    return [{n: t.numpy() for n, t in zip(names, b)} for b in batches]


def integral_constants_to_int(gm: torch.fx.GraphModule) -> int:
    """Cast back to int64 the 0-d float tensor constants with an integral value whose users combine them only
    with integer tensors. The PT2E quantizers' ``_convert_scalars_to_attrs`` turns the Python scalar of
    transformers' mask building (``arange(128) + 0``) into ``tensor(0.)``: the sum becomes float and the
    ``aten.index`` that uses it fails (IndexError). Returns how many were cast."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith("_tensor_constant"):
            continue
        t = getattr(gm, node.target)
        if not (isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point() and float(t) == int(t)):
            continue
        others = [a for u in node.users for a in u.args if isinstance(a, torch.fx.Node) and a is not node]
        if others and all(isinstance(a.meta.get("val"), torch.Tensor) and not a.meta["val"].is_floating_point() for a in others):
            setattr(gm, node.target, t.to(torch.int64))
            n += 1
    return n


def pt2e(task: Task, quantizer: Any, note: list[str], fold: bool = True) -> nn.Module:
    """torch.export -> prepare_pt2e -> batch-1 calibration -> convert_pt2e. When calibration fails and
    :func:`integral_constants_to_int` finds constants to fix, it retries once with them fixed (``note`` says so)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    def calibrate(prepared: nn.Module) -> None:
        for batch in task.calib:
            for i in range(len(batch[0])):  # batch-1 calibration: the graph was exported for one row
                prepared(*(t[i:i + 1] for t in batch))

    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(task.model, task.example).module(), copy.deepcopy(quantizer))
        try:
            calibrate(prepared)
        except IndexError as exc:
            prepared = prepare_pt2e(torch.export.export(task.model, task.example).module(), quantizer)
            fixed = integral_constants_to_int(prepared)
            if not fixed:
                raise
            calibrate(prepared)
            note.append(f"as documented, calibration failed ({short_error(exc)}): the quantizer turned {fixed} integer "
                        "scalar(s) of transformers' mask building into float constants; run with them cast back to int64")
        return convert_pt2e(prepared, fold_quantize=fold)


def peer_paths(task: Task, work: Path, limit: float, fp32_onnx: Path | None) -> list[DPath]:
    out = []

    def torch_ao(p: DPath) -> None:
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(copy.deepcopy(task.model), {nn.Linear}, dtype=torch.qint8).eval()
        p.make, p.wants = torch_runner(q), "torch"
        p.size_bytes, p.size_what = state_dict_bytes(q), "torch.save(state_dict)"
        p.note = "quantize_dynamic({nn.Linear}, qint8), default qconfig (per-tensor); other layers fp32"

    def ort_dynamic(p: DPath) -> None:
        from onnxruntime.quantization import quantize_dynamic

        if fp32_onnx is None:
            raise RuntimeError("no fp32 ONNX export")
        src, note = ort_preprocess(fp32_onnx, work)
        file = work / "ort_dynamic.onnx"
        quantize_dynamic(str(src), str(file))
        p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, ".onnx file"
        p.note = f"{note}; quantize_dynamic defaults (QInt8 weights per tensor, dynamic uint8 activations)"
        set_runner(p, "ONNX Runtime", file)

    def ort_static(p: DPath) -> None:
        from onnxruntime.quantization import quantize_static

        if fp32_onnx is None:
            raise RuntimeError("no fp32 ONNX export")
        src, note = ort_preprocess(fp32_onnx, work)
        import onnxruntime as ort

        names = [i.name for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()]
        feeds = numpy_feeds(task.calib, names)
        file = work / "ort_static.onnx"
        quantize_static(str(src), str(file), calibration_reader(feeds))
        p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, ".onnx file"
        p.note = f"{note}; quantize_static defaults (QDQ, QInt8 activations and weights, per tensor, MinMax, " \
                 f"{len(feeds)} calibration batches)"
        set_runner(p, "ONNX Runtime", file)

    def litert(dynamic: bool) -> Callable[[DPath], None]:
        def fn(p: DPath) -> None:
            import litert_torch
            from litert_torch.quantize import pt2e_quantizer
            from litert_torch.quantize.quant_config import QuantConfig

            cfg = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(cfg)
            notes: list[str] = []
            converted = pt2e(task, quantizer, notes, fold=False)
            with torch.no_grad():
                content = litert_torch.convert(converted, task.example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
            file = work / f"litert_{'dynamic' if dynamic else 'static'}.tflite"
            file.write_bytes(content)
            p.file, p.size_bytes, p.size_what = file.name, len(content), ".tflite file"
            p.note = ("PT2EQuantizer, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True) "
                      "(litert-torch's documented example); default resolver (XNNPACK delegate)" if dynamic else
                      "PT2EQuantizer, get_symmetric_quantization_config(is_per_channel=True), calibrated on the "
                      "calibration batches row by row; default resolver (XNNPACK delegate)")
            p.note = "; ".join([p.note, *notes])
            set_runner(p, "TFLite", file, xnnpack=True)
        return fn

    def xnnpack(dynamic: bool) -> Callable[[DPath], None]:
        def fn(p: DPath) -> None:
            import executorch.kernels.quantized  # noqa: F401 - out variants of the quantized ops
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from executorch.exir import to_edge_transform_and_lower

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
            notes: list[str] = []
            converted = pt2e(task, quantizer, notes)
            with torch.no_grad():
                program = to_edge_transform_and_lower(torch.export.export(converted, task.example),
                                                      partitioner=[XnnpackPartitioner()]).to_executorch()
            file = work / f"et_xnnpack_{'dynamic' if dynamic else 'static'}.pte"
            file.write_bytes(program.buffer)
            p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, ".pte file"
            p.note = ("XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True"
                      + (", is_dynamic=True)" if dynamic else "), calibrated (ExecuTorch's XNNPACK docs)")
                      + "; XnnpackPartitioner")
            p.note = "; ".join([p.note, *notes])
            set_runner(p, "ExecuTorch", file)
        return fn

    builders = {
        "torch.ao dynamic": ("PyTorch", "int8 W + int8 A (dynamic, per tensor)", torch_ao),
        "ORT quantize_dynamic": ("ONNX Runtime", "int8 W + uint8 A (dynamic)", ort_dynamic),
        "ORT quantize_static QDQ": ("ONNX Runtime", "int8 W + int8 A (static QDQ)", ort_static),
        "LiteRT PT2E dynamic-range": ("TFLite", "int8 W per channel, dynamic-range A", litert(True)),
        "LiteRT PT2E static": ("TFLite", "int8 W per channel + int8 A (full integer)", litert(False)),
        "XNNPACKQuantizer static": ("ExecuTorch", "int8 W per channel + int8 A (static)", xnnpack(False)),
        "XNNPACKQuantizer dynamic": ("ExecuTorch", "int8 W per channel + int8 A (dynamic)", xnnpack(True)),
    }
    for name in task.peers:
        runtime, config, fn = builders[name]
        out.append(build(DPath(name, runtime, "peer", config, default_peer=name in task.default_peers), fn, limit))
    return out
