"""The runtimes compared, their runners (threads -> callable) and thread settings."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import squeezer
from deployment.guards import quiet

RUNTIMES = ("PyTorch", "ONNX Runtime", "TFLite", "ExecuTorch")
FORMAT_SUFFIX = {"ONNX Runtime": ".onnx", "TFLite": ".tflite", "ExecuTorch": ".pte"}
EVAL_THREADS = 1  # accuracy runs, and the threads a runner is first loaded with

_PTE_STATES: list[dict[str, Any]] = []  # loaded ExecuTorch programs, dropped before the thread pool is reset


def et_threadpool(n: int | None = None) -> int | None:
    """ExecuTorch's thread pool size (XNNPACK's threads), set to ``n`` when given; None without ExecuTorch.
    Programs loaded before a reset crash when run after it (XNNPACK keeps the old pool): every loaded
    program is dropped first and reloaded on its next use."""
    try:
        with quiet():
            from executorch.extension.pybindings import portable_lib
        if n is not None:
            for state in _PTE_STATES:
                state.clear()
            gc.collect()
            portable_lib._unsafe_reset_threadpool(n)
        return int(portable_lib._threadpool_get_thread_count())
    except Exception:  # noqa: BLE001
        return None


def set_threads(n: int) -> dict[str, Any]:
    """torch's intra-op threads and ExecuTorch's thread pool set to ``n``; what each now holds."""
    torch.set_num_threads(n)
    return {"torch": torch.get_num_threads(), "executorch_threadpool": et_threadpool(n)}


def torch_runner(model: nn.Module) -> Callable[[int], Callable[..., Any]]:
    """The model itself at any thread count (torch's threads are global: :func:`set_threads`)."""
    return lambda _threads: model


def onnx_runner(path: Path) -> Callable[[int], Callable[..., Any]]:
    """``squeezer.runtime.load(path, threads, spinning=False)``: spin-waiting workers would take the cores
    from the next path of a round (see bench/peers.py)."""
    return lambda threads: squeezer.runtime.load(path, threads=threads, spinning=False)


def tflite_runner(path: Path, xnnpack: bool) -> Callable[[int], Callable[..., Any]]:
    return lambda threads: squeezer.runtime.load(path, threads=threads, xnnpack=xnnpack)


def pte_runner(path: Path) -> Callable[[int], Callable[..., Any]]:
    state: dict[str, Any] = {}
    _PTE_STATES.append(state)

    def make(_threads: int) -> Callable[..., Any]:  # threads: the global ExecuTorch thread pool
        if "run" not in state:
            state["run"] = squeezer.runtime.load(path)
        return state["run"]
    return make
