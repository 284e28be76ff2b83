"""The pretrained EfficientNet-Lite0 (extra ``squeezer[vision]``; its convolutions are ``Conv2dStaticSamePadding``
subclasses that keep their own forward) quantized with each preset: top-1 agreement with fp32 on seeded random
resized crops of scikit-learn's two photographs, simulated, packed and (static presets) in the exported TFLite file
run by ``squeezer.runtime.load``; checkpoint size on disk and packed batch-1 latency (median).

    python bench/efficientnet.py [--crops 200] [--calib 32] [--presets w8 w8a8 w8a8-static w4g128] [--tflite w8a8-static] [--no-correct-bias]

Prints the table and writes ``bench/results/efficientnet.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
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
from common import RESULTS, log, utc_now, write_json  # noqa: E402
from machine import machine_record, versions  # noqa: E402
from squeezer.examples.efficientnet import load_efficientnet_lite0, random_resized_crops, top1_agreement  # noqa: E402

PRESETS = ("w8", "w8a8", "w8a8-static", "w4g128")
BATCH = 25


def logits(model: Any, crops: Tensor) -> Tensor:
    """``model`` on ``crops`` in batches of :data:`BATCH` (a module or a runtime runner)."""
    with torch.no_grad():
        return torch.cat([torch.as_tensor(model(b)) for b in crops.split(BATCH)])


def batch1_ms(model: nn.Module, crop: Tensor, repeats: int = 7) -> float:
    """Median wall time of one batch-1 forward, in ms (after one warm-up call)."""
    times = []
    with torch.no_grad():
        model(crop)
        for _ in range(repeats):
            start = time.perf_counter()
            model(crop)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run_preset(model: nn.Module, preset: str, crops: Tensor, reference: Tensor, calib: list[Tensor],
               tflite: bool, tmp: Path, correct_bias: bool) -> dict[str, Any]:
    """One row: agreements (simulated / packed / TFLite), checkpoint bytes, packed batch-1 ms."""
    row: dict[str, Any] = {"preset": preset, "correct_bias": correct_bias}
    q = squeezer.quantize(model, preset, calib=calib, progress=False, correct_bias=correct_bias)
    row["agreement_simulated"] = top1_agreement(logits(q, crops), reference)
    packed = squeezer.pack(q)
    row["agreement_packed"] = top1_agreement(logits(packed, crops), reference)
    squeezer.save(packed, tmp / preset)
    row["checkpoint_bytes"] = directory_bytes(tmp / preset)
    row["batch1_ms_packed"] = batch1_ms(packed, crops[:1])
    if tflite:
        path = tmp / f"{preset}.tflite"
        report = squeezer.export(q, crops[:1], path, calib=calib)
        row["agreement_tflite"] = top1_agreement(logits(squeezer.runtime.load(path), crops), reference)
        row["tflite_bytes"] = path.stat().st_size
        row["tflite_warnings"] = len(report.warnings)
    log(f"{preset}: {row}")
    return row


def table(rows: list[dict[str, Any]], fp32: dict[str, Any]) -> str:
    head = f"{'preset':<13}{'sim':>7}{'packed':>8}{'tflite':>8}{'size MB':>9}{'b1 ms':>8}"
    lines = [head, f"{'fp32':<13}{1:>7.3f}{1:>8.3f}{'':>8}{fp32['bytes'] / 1e6:>9.2f}{fp32['batch1_ms']:>8.1f}"]
    for r in rows:
        tfl = f"{r['agreement_tflite']:.3f}" if "agreement_tflite" in r else "-"
        lines.append(f"{r['preset']:<13}{r['agreement_simulated']:>7.3f}{r['agreement_packed']:>8.3f}{tfl:>8}"
                     f"{r['checkpoint_bytes'] / 1e6:>9.2f}{r['batch1_ms_packed']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=200, help="evaluation crops (seed 0)")
    parser.add_argument("--calib", type=int, default=32, help="calibration crops (seed 1, disjoint draws)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--tflite", nargs="*", default=["w8a8-static"], help="presets also exported to TFLite")
    parser.add_argument("--no-correct-bias", dest="correct_bias", action="store_false",
                        help="quantize without folding each convolution's mean output shift into its bias")
    parser.add_argument("--out", type=Path, default=RESULTS / "efficientnet.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = load_efficientnet_lite0()
    crops = random_resized_crops(args.crops, seed=0)
    calib = list(random_resized_crops(args.calib, seed=1).split(8))
    reference = logits(model, crops)
    fp32 = {"bytes": sum(p.numel() * p.element_size() for p in model.state_dict().values()),
            "batch1_ms": batch1_ms(model, crops[:1])}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            rows.append(run_preset(model, preset, crops, reference, calib, preset in args.tflite, Path(tmp),
                                    args.correct_bias))
    print(table(rows, fp32))
    write_json(args.out, {"date": utc_now(), "machine": machine_record(versions("torch", "squeezer", "ai_edge_litert"), threads=torch.get_num_threads()), "crops": args.crops, "calib": args.calib,
                          "fp32": fp32, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
