"""Memory and pack time of a packed 1 B-shaped stack: does a packed model hold one copy of its weights?

The stack: ``--blocks`` (22) blocks of TinyLlama's linear shapes (hidden 2048, intermediate 5632, grouped k / v
of 256 outputs; 7 ``nn.Linear`` a block), ``torch.randn`` weights in bf16, quantized without calibration
(``squeezer.quantize(model, preset)``), then ``squeezer.pack(inplace=True)``. Each preset runs in a fresh
subprocess, which reports:

* ``packed_weight_bytes``: the packed weights' own bytes (codes + parameters, :class:`PackedWeight` ``nbytes``);
* ``runtime_bytes``: what the pack report says the runtimes hold;
* ``rss_after_pack``: resident memory once packed (float model freed), and ``rss_trimmed`` after
  ``malloc_trim(0)`` hands the heap's free pages back (glibc keeps what quantizing's temporaries freed);
* ``peak_packed``: the resident high-water mark over batch-1 forwards of the packed model (peak reset after
  after trimming, ``/proc/self/clear_refs``), so ``peak_packed / packed_weight_bytes`` is the goal's ratio (<= 1.1 plus
  activations and the interpreter's own ~0.3 GB, shown as ``rss_base``);
* ``pack_s``, ``quantize_s``, ``forward_ms`` (median of batch-1 forwards).

Run: ``python bench/packed_memory.py [--blocks 22] [--presets w8 w4g128] [--label NAME]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, table_head, table_row, utc_now, write_json  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 2048, 5632, 256
GB = 1e9


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _stack(blocks: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        """TinyLlama's 7 linear layers: ``x + o(q(x)) + down(gate(x) * up(x))`` (k, v computed, unused)."""

        def __init__(self) -> None:
            super().__init__()
            for name, (n, k) in dict(q=(HIDDEN, HIDDEN), k=(KV, HIDDEN), v=(KV, HIDDEN), o=(HIDDEN, HIDDEN),
                                     gate=(INTERMEDIATE, HIDDEN), up=(INTERMEDIATE, HIDDEN),
                                     down=(HIDDEN, INTERMEDIATE)).items():
                layer = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(n, k, dtype=torch.bfloat16) * k ** -0.5)
                setattr(self, name, layer)

        def forward(self, x):
            self.k(x), self.v(x)
            return x + self.o(self.q(x)) + self.down(self.gate(x) * self.up(x))

    torch.manual_seed(0)
    return nn.Sequential(*(Block() for _ in range(blocks)))


def run_case(preset: str, blocks: int, forwards: int) -> dict:
    """Build, quantize, pack and run one preset in this process; the figures of the module docstring."""
    import torch

    import squeezer
    from squeezer.kernels import PackReport

    rss_base = _status_kb("VmRSS")
    model = _stack(blocks)
    t0 = time.perf_counter()
    q = squeezer.quantize(model, preset, inplace=True, progress=False)
    t1 = time.perf_counter()
    squeezer.pack(q, inplace=True)
    pack_s = time.perf_counter() - t1
    gc.collect()
    report = squeezer.report_of(q, PackReport)
    layers = [m for m in q.modules() if getattr(m, "is_packed", False)]
    rss_after = _status_kb("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back the heap that quantizing's float temporaries left free
    rss_trimmed = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    x = torch.randn(1, 1, HIDDEN)
    times = []
    with torch.inference_mode():
        for _ in range(forwards):
            t = time.perf_counter()
            q(x)
            times.append(time.perf_counter() - t)
    return {"preset": preset, "blocks": blocks, "layers": len(layers),
            "params": sum(int(torch.tensor(m.runtime.weight.shape).prod()) for m in layers),
            "packed_weight_bytes": sum(m.runtime.weight.nbytes for m in layers),
            "runtime_bytes": sum(r.runtime_bytes for r in report.layers),
            "kernels": sorted({k for r in report.layers for k in r.kernels.values()}),
            "rss_base": rss_base, "rss_after_pack": rss_after, "rss_trimmed": rss_trimmed, "peak_packed": _status_kb("VmHWM"),
            "quantize_s": t1 - t0, "pack_s": pack_s, "forward_ms": 1e3 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=22)
    parser.add_argument("--presets", nargs="+", default=["w8", "w4g128"])
    parser.add_argument("--forwards", type=int, default=5)
    parser.add_argument("--label", default="one_copy")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.blocks, args.forwards)))
        return
    rows = []
    for preset in args.presets:
        out = subprocess.run([sys.executable, __file__, "--case", preset, "--blocks", str(args.blocks),
                              "--forwards", str(args.forwards)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = ["preset", "params", "packed GB", "runtime GB", "RSS base GB", "RSS packed GB", "trimmed GB", "peak fwd GB",
            "peak / packed", "quantize s", "pack s", "fwd ms", "kernels"]
    lines = table_head(head)
    for r in rows:
        extra = r["peak_packed"] - r["rss_base"]
        lines.append(table_row([r["preset"], f"{r['params'] / 1e9:.3f} B", f"{r['packed_weight_bytes'] / GB:.3f}",
                                f"{r['runtime_bytes'] / GB:.3f}", f"{r['rss_base'] / GB:.2f}",
                                f"{r['rss_after_pack'] / GB:.3f}", f"{r['rss_trimmed'] / GB:.3f}",
                                f"{r['peak_packed'] / GB:.3f}",
                                f"{extra / r['packed_weight_bytes']:.2f}", f"{r['quantize_s']:.1f}",
                                f"{r['pack_s']:.1f}", f"{r['forward_ms']:.1f}", ", ".join(r["kernels"])]))
    print("\n".join(lines))
    write_json(RESULTS / f"packed_memory_{args.label}.json", {"when": utc_now(), "label": args.label, "rows": rows})


if __name__ == "__main__":
    main()
