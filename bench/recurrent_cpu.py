"""Packed ``w8a8`` LSTM / GRU at batch 1: CPU time per sequence of the compiled step loop against the Python loop.

    python bench/recurrent_cpu.py [--rounds N] [--quick]

The fraud scorers' recurrent shape (input 19, hidden 64, 32 steps, batch 1, one thread), untrained seeded
weights. Timed paths: ``fp32 torch`` (``nn.LSTM`` / ``nn.GRU``), ``torch.ao dynamic``
(``quantize_dynamic``, qint8), squeezer ``w8a8`` packed (``compiled loop``: the rule's runtime, its steps in
``squeezer.kernels.recurrent_loops``' TorchScript loop), the same runtime on ``run_recurrent``'s Python loop
(``Python loop``), and its input projection alone (``input projection``: ``X W_ih^T + b_ih`` on all steps at
once, once per sequence). The clock is the thread's CPU time (``time.thread_time``), not wall time: on a
machine shared with other work a call of several milliseconds is preempted many times and its wall time
grows with the load, while its CPU time does not. Each round runs every path three times in a row, paths
in a new random order per round; the table gives the median per path and the median per-round ratio to
``fp32 torch``. Writes ``bench/results/recurrent_cpu.json`` (``--quick``: ``bench/results/quick/``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import squeezer
from common import RESULTS, log, table_head, table_row, write_json
from machine import loadavg, machine_record, versions
from squeezer.modules.recurrent_steps import run_recurrent

INPUT, HIDDEN, STEPS = 19, 64, 32
FP32 = "fp32 torch"


class Scorer(nn.Module):
    """The recurrent layer's output sequence."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(INPUT, HIDDEN, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def _calls(kind: str) -> tuple[dict[str, Callable[[], Any]], bool]:
    """The timed calls of one cell kind, and whether the compiled loop equals the Python loop bit for bit."""
    torch.manual_seed(0)
    model = Scorer(kind).eval()
    calib = [(torch.randn(64, STEPS, INPUT),) for _ in range(4)]
    packed = squeezer.pack(squeezer.quantize(model, "w8a8", calib, progress=False))
    ao = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.GRU}, torch.qint8)
    rnn, x = packed.rnn, torch.randn(1, STEPS, INPUT)
    calls = {FP32: lambda: model(x), "torch.ao dynamic": lambda: ao(x), "w8a8 compiled loop": lambda: packed(x),
             "w8a8 Python loop": lambda: run_recurrent(rnn, rnn.runtime, x),
             "w8a8 input projection": lambda: rnn.runtime.input_projection("l0", x.reshape(STEPS, INPUT))}
    with torch.no_grad():
        same = torch.equal(packed(x), run_recurrent(rnn, rnn.runtime, x)[0])
    return calls, same


def _cpu_ms(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Thread CPU ms per call, one sample per path and round (the mean of 3 calls in a row)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        for _ in range(5):
            fn()
    for r in range(rounds):
        for name in random.Random(r).sample(list(calls), len(calls)):
            start = time.thread_time()
            for _ in range(3):
                calls[name]()
            samples[name].append((time.thread_time() - start) / 3 * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="15 rounds, results under quick/")
    args = parser.parse_args()
    rounds = 15 if args.quick else args.rounds
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows, results = [], []
    with torch.no_grad():
        for kind in ("LSTM", "GRU"):
            log(f"{kind}: {rounds} rounds")
            calls, same = _calls(kind)
            samples = _cpu_ms(calls, rounds)
            for name, ms in samples.items():
                ratio = statistics.median(a / b for a, b in zip(ms, samples[FP32]))
                median = statistics.median(ms)
                results.append({"cell": kind, "path": name, "cpu_ms_per_sequence": median,
                                "cpu_us_per_step": 1e3 * median / STEPS, "vs_fp32_torch": ratio,
                                "compiled_equals_python_loop": same})
                rows.append(table_row([kind, name, f"{median:.3f}", f"{1e3 * median / STEPS:.1f}", f"{ratio:.2f}"]))
    print("\n".join([*table_head(["cell", "path", "CPU ms / sequence", "CPU us / step", "× fp32 torch"]), *rows]))
    out = RESULTS / ("quick" if args.quick else "") / "recurrent_cpu.json"
    machine = {**machine_record(versions("torch"), threads=1, rounds=rounds), "loadavg_end": loadavg()}
    write_json(out, {"machine": machine,
                     "shape": {"input": INPUT, "hidden": HIDDEN, "steps": STEPS, "batch": 1}, "results": results})
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
