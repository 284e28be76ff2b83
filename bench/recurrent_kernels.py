"""Packed recurrent layers: per-sequence latency of a squeezer LSTM on integer kernels against fp32.

    python bench/recurrent_kernels.py [--seconds N] [--threads N] [--quick]

One LSTM layer (input 128, hidden 128 and 256, 50 steps), batches 1 and 64, timed round-robin
(``round_robin.py``: every path in each round, in a new random order) in one process:

* ``fp32 torch``: ``nn.LSTM`` itself (torch's fused recurrence);
* ``fp32 step loop``: the same weights through squeezer's step loop (``run_recurrent`` with float
  products): what a model dequantized once runs in the loop the packed layer uses;
* ``w8`` / ``w4g128`` / ``w8a8``: ``squeezer.pack(squeezer.quantize(lstm, preset))``, the runtime of the
  rule: weight-only presets run ``dequant_fused`` (the codes unpacked per call into torch's fused
  recurrence), ``w8a8`` the step loop on int8 kernels, compiled (``squeezer.kernels.recurrent_loops``; each
  matrix's path per rows bucket is listed: the input projection runs once per sequence on ``T B`` rows, the
  recurrent product once per step on ``B`` rows);
* ``w8 int8 loop`` / ``w4g128 int4 loop``: the step loop with ``int8_weight_bf16`` / ``int4_weight_bf16``
  pinned for every matrix and rows bucket: the integer weight-only kernels ``dequant_fused`` is chosen over.

Prints a table (median ms per sequence, per step, and the round-by-round ratio to ``fp32 torch`` and to
the fp32 step loop) and writes ``bench/results/recurrent_kernels.json`` (``--quick``: ``bench/results/quick/``).
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from typing import Any

import torch
from torch import nn

import squeezer
from common import RESULTS, fmt_ms, log, table_head, table_row, write_json
from machine import machine_record, versions
from round_robin import paired_rounds, time_round_robin
from squeezer.kernels.select import bucket_label, bucket_of
from squeezer.modules.recurrent_steps import FloatOps, run_recurrent

INPUT, STEPS = 128, 50
HIDDEN, BATCHES = (128, 256), (1, 64)
PRESETS = {"w8": "rule", "w4g128": "rule", "w8a8": "rule", "w8 int8 loop": {"0": "int8_weight_bf16"},
           "w4g128 int4 loop": {"0": "int4_weight_bf16"}}
"""Timed name -> its kernels (the preset is the name's first word)."""
FP32, LOOP = "fp32 torch", "fp32 step loop"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _calls(hidden: int, batch: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The timed calls of one configuration, and what each is (error against fp32, bytes, kernels)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(INPUT, hidden, batch_first=True).eval()
    x = torch.randn(batch, STEPS, INPUT)
    with torch.no_grad():
        reference = lstm(x)[0]
    floats = sum(w.numel() * 4 for n, w in lstm.named_parameters() if n.startswith("weight"))
    calls = {FP32: lambda: lstm(x), LOOP: lambda: run_recurrent(lstm, FloatOps(lstm), x)}
    about = {FP32: {"weight_bytes": floats, "rel_error": 0.0}, LOOP: {"weight_bytes": floats}}
    with torch.no_grad():
        about[LOOP]["rel_error"] = _rel(calls[LOOP]()[0], reference)
    for name, kernels in PRESETS.items():
        packed = squeezer.pack(squeezer.quantize(nn.Sequential(lstm), name.split()[0]), kernels=kernels)[0]
        calls[name] = lambda packed=packed: packed(x)
        with torch.no_grad():
            error = _rel(packed(x)[0], reference)
        kernels = packed.runtime.describe()
        about[name] = {"weight_bytes": packed.runtime.nbytes(), "rel_error": error,
                         "input_projection": kernels[f"weight_ih_l0 {_bucket(batch * STEPS)}"],
                         "recurrent_step": kernels[f"weight_hh_l0 {_bucket(batch)}"]}
    return calls, about


def _bucket(rows: int) -> str:
    """The label of the rows bucket that holds ``rows``."""
    return bucket_label(bucket_of(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="timing budget per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 s per configuration, results under quick/")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows, results = [], []
    with torch.no_grad():
        for hidden in HIDDEN:
            for batch in BATCHES:
                log(f"hidden {hidden}, batch {batch}: timing {seconds:.0f} s")
                calls, about = _calls(hidden, batch)
                samples, round_ms, info = time_round_robin(calls, seconds, min_rounds=5, max_rounds=200)
                for name in calls:
                    ms = statistics.median(samples[name])
                    entry = {"hidden": hidden, "batch": batch, "path": name, "ms_per_sequence": ms,
                             "ms_per_step": ms / STEPS, **about[name],
                             "vs_fp32_torch": paired_rounds(round_ms[name], round_ms[FP32]),
                             "vs_fp32_step_loop": paired_rounds(round_ms[name], round_ms[LOOP]), "timing": info}
                    results.append(entry)
                    rows.append(table_row([
                        str(hidden), str(batch), name, fmt_ms(ms), fmt_ms(ms / STEPS),
                        _ratio(entry["vs_fp32_torch"]), _ratio(entry["vs_fp32_step_loop"]),
                        f"{about[name]['weight_bytes']:,}", f"{about[name]['rel_error']:.4f}",
                        about[name].get("input_projection", "—"), about[name].get("recurrent_step", "—")]))
    head = ["hidden", "batch", "path", "ms / sequence", "ms / step", "× fp32 torch", "× fp32 loop",
            "weight bytes", "rel. error", f"input proj. ({STEPS} B rows)", "step (B rows)"]
    print("\n".join([*table_head(head), *rows]))
    out = RESULTS / ("quick" if args.quick else "") / "recurrent_kernels.json"
    write_json(out, {"machine": machine_record(versions("torch"), threads=args.threads, seconds=seconds,
                                               steps=STEPS, input=INPUT), "results": results})
    log(f"wrote {out}")


def _ratio(paired: dict[str, Any]) -> str:
    """``0.52 (0.50–0.55)``: the median per-round time ratio with its 95 % interval."""
    if not paired.get("rounds"):
        return "—"
    lo, hi = paired["ratio_ci95"]
    return f"{paired['median_ratio']:.2f} ({lo:.2f}–{hi:.2f})"


if __name__ == "__main__":
    main()
