"""Probes behind the issue notes: small experiments that explain a benchmark figure.

    python bench/probes.py distill      # distillation variants (digits CNN, credit MLP), seeds 1-6
    python bench/probes.py same-graph   # identical ONNX graphs / int8 PyTorch paths timed in an interleaved A/B,
                                        # one file's speed in several sessions of one process, and
                                        # what the benchmark's timing rounds do to these files
    python bench/probes.py memory       # what quantizing MiniLM adds to resident memory, part by part
    python bench/probes.py w4           # MiniLM W4 g128: GPTQ's options, calibration size and Hadamard rotation vs the accuracy goal
    python bench/probes.py w4-ceiling   # MiniLM: the best W4 g128 algorithm with finer groups and more bits (where agreement 0.97 lies)
    python bench/probes.py kernel-choice [--seconds N | --quick]
                                        # squeezer.pack(kernels="rule") vs kernels="time", timed against each other
                                        # round by round (MLP of peers.py and a 4096x4096 Linear, batches 1 and 16)

Each prints a table and writes ``bench/results/probe_<name>.json`` (``--quick``: ``bench/results/quick/``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import squeezer
from squeezer.examples.minilm import load_minilm
from compression import digits_data
from common import RESULTS, fmt_ms, log, table_head, table_row, write_json
from machine import PeakMemory, cpu_info
from peers import THREADS, make_mlp, mlp_inputs
from round_robin import paired_rounds, time_round_robin
from squeezer.distill import distill
from squeezer.examples.credit import evaluate_credit, make_credit_task, train_credit_model
from squeezer.examples.digits import DigitsCNN, digits_accuracy, make_digits_task, train_digits_model
from squeezer.kernels import packed_kernels
from squeezer.kernels.select import bucket_of
from squeezer.training import fit

SEEDS = (1, 2, 3, 4, 5, 6)


class Noisy:
    """The batches with Gaussian noise of std ``sigma`` added, fresh (seeded) on every pass."""

    def __init__(self, batches: list, sigma: float, seed: int) -> None:
        self.batches, self.sigma, self.gen = batches, sigma, torch.Generator().manual_seed(seed)

    def __iter__(self):
        for x, y in self.batches:
            yield x + self.sigma * torch.randn(x.shape, generator=self.gen), y


def probe_distill() -> dict[str, Any]:
    """Student with vs without a teacher, same batches / epochs / seeds; mean and per-seed score."""
    torch.set_num_threads(1)
    task = make_digits_task(seed=0)
    data = digits_data(task)
    teacher16 = train_digits_model(task, seed=0, epochs=15)
    torch.manual_seed(0)
    teacher32 = DigitsCNN(width=32)
    fit(teacher32, data, epochs=30, lr=2e-3)
    teacher32.eval()

    def digits(teacher: nn.Module | None, epochs: int, sigma: float = 0.0, **kd: Any) -> Callable[[int], float]:
        def run(seed: int) -> float:
            torch.manual_seed(seed)
            student = DigitsCNN(width=4)
            batches = Noisy(data, sigma, seed) if sigma else data
            if teacher is None:
                fit(student, batches, epochs=epochs, lr=2e-3)
            else:
                distill(student, teacher, batches, epochs=epochs, lr=2e-3, inplace=True, **kd)
            return digits_accuracy(student.eval(), task)
        return run

    credit = make_credit_task(seed=0)
    credit_teacher = train_credit_model(credit, seed=0)
    idx = torch.randperm(len(credit.y_train), generator=torch.Generator().manual_seed(0))
    credit_data = [(credit.x_train[i], credit.y_train[i]) for i in idx.split(64)]

    def credit_run(epochs: int, **kd: Any) -> Callable[[int], float]:
        def run(seed: int) -> float:
            torch.manual_seed(seed)
            student = nn.Sequential(nn.Linear(credit.x_train.shape[1], 32), nn.ReLU(), nn.Linear(32, 1), nn.Flatten(0))
            opt = torch.optim.Adam(student.parameters(), lr=1e-3, weight_decay=5e-2)
            if kd:
                distill(student, credit_teacher, credit_data, epochs=epochs, optimizer=opt, inplace=True, **kd)
            else:
                fit(student, credit_data, epochs=epochs, optimizer=opt)
            return evaluate_credit(student.eval(), credit)["roc_auc"]
        return run

    settings: list[tuple[str, Callable[[int], float]]] = [
        ("digits 15 ep: plain", digits(None, 15)),
        ("digits 15 ep: KD T2 a0.5", digits(teacher16, 15, alpha=0.5, temperature=2.0)),
        ("digits 15 ep: KD T4 a0.2", digits(teacher16, 15, alpha=0.2, temperature=4.0)),
        ("digits 15 ep: KD T4 a0.5, teacher width 32", digits(teacher32, 15, alpha=0.5, temperature=4.0)),
        ("digits 15 ep: features conv2 (a1)", digits(teacher16, 15, alpha=1.0, features={"conv2": "conv2"})),
        ("digits 15 ep, noise 0.15: plain", digits(None, 15, 0.15)),
        ("digits 15 ep, noise 0.15: KD T2 a0.5", digits(teacher16, 15, 0.15, alpha=0.5, temperature=2.0)),
        ("digits 15 ep, noise 0.3: plain", digits(None, 15, 0.3)),
        ("digits 15 ep, noise 0.3: KD T2 a0.5", digits(teacher16, 15, 0.3, alpha=0.5, temperature=2.0)),
        ("digits 40 ep: plain", digits(None, 40)),
        ("digits 40 ep: KD T1 a0.5, teacher width 32", digits(teacher32, 40, alpha=0.5, temperature=1.0)),
        ("digits 40 ep: KD T4 a0.5, teacher width 32", digits(teacher32, 40, alpha=0.5, temperature=4.0)),
        ("credit 10 ep: plain (ROC-AUC)", credit_run(10)),
        ("credit 10 ep: KD T4 a0.2 (ROC-AUC)", credit_run(10, alpha=0.2, temperature=4.0)),
        ("credit 30 ep: plain (ROC-AUC)", credit_run(30)),
        ("credit 30 ep: KD T4 a0.2 (ROC-AUC)", credit_run(30, alpha=0.2, temperature=4.0)),
    ]
    rows = []
    for name, run in settings:
        scores = [run(seed) for seed in SEEDS]
        rows.append({"setting": name, "mean": statistics.mean(scores), "per_seed": scores})
        print(f"{name:48s} {statistics.mean(scores):.4f}  " + " ".join(f"{s:.4f}" for s in scores), flush=True)
    return {"teacher_width16_accuracy": digits_accuracy(teacher16, task),
            "teacher_width32_accuracy": digits_accuracy(teacher32, task), "seeds": list(SEEDS), "rows": rows}


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int = 40, block: int = 10, warm: int = 1,
                 shuffle: bool = False) -> dict[str, float]:
    """Median ms per callable, timed in rounds of ``block`` calls after ``warm`` untimed ones; the order
    alternates between rounds, or is a new seeded random one with ``shuffle``."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        names = list(calls)
        for name in (random.Random(r).sample(names, len(names)) if shuffle else names if r % 2 else names[::-1]):
            for _ in range(warm):
                calls[name]()
            for _ in range(block):
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def probe_same_graph(work: Path) -> dict[str, Any]:
    """MLP 1024-4096-4096-1024, batch 1, 2 threads: squeezer's ONNX files vs ONNX Runtime's own MatMulNBits
    files (graphs compared after ONNX Runtime's optimizer), and squeezer's packed w8a8 vs torch.ao dynamic."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from peers import export_fp32
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
    x = torch.randn(1, 1024)
    export_fp32(mlp, x, work / "fp32.onnx")
    files = {}
    for preset, bits in (("w4g128", 4), ("w8", 8)):
        files[f"squeezer {preset}"] = work / f"squeezer_{preset}.onnx"
        squeezer.export(squeezer.quantize(mlp, preset, progress=False), x, files[f"squeezer {preset}"])
        cfg = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False, accuracy_level=4, bits=bits)
        quant = MatMulNBitsQuantizer(onnx.load(str(work / "fp32.onnx")), bits=bits, block_size=128, is_symmetric=False,
                                     accuracy_level=4, algo_config=cfg)
        quant.process()
        files[f"ORT MatMulNBits int{bits}"] = work / f"ort_{bits}.onnx"
        quant.model.save_model_to_file(str(files[f"ORT MatMulNBits int{bits}"]), False)
    graphs, calls = {}, {}
    feed = x.numpy()
    for name, path in files.items():
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
        graphs[name] = [(n.op_type, sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute))
                        for n in optimized.graph.node]
        run = squeezer.runtime.load(path, threads=2, spinning=False)
        calls[name] = lambda run=run: run(feed)
    torch.set_num_threads(2)
    packed = squeezer.pack(squeezer.quantize(mlp, "w8a8", progress=False), inplace=True)
    torch_ao = quantize_dynamic(copy.deepcopy(mlp), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    with torch.inference_mode():
        calls["squeezer w8a8 packed (PyTorch)"] = lambda: packed(x)
        calls["torch.ao dynamic per-channel"] = lambda: torch_ao(x)
        ms = _interleaved(calls)
    same = {f"int{b}": graphs[f"squeezer {p}"] == graphs[f"ORT MatMulNBits int{b}"] for p, b in (("w4g128", 4), ("w8", 8))}
    for name, value in ms.items():
        print(f"{name:36s} {value:.3f} ms")
    print("optimized graphs identical (op types and attributes):", same)
    # The same file loaded in several sessions of one process, interleaved (with the fp32 file, whose
    # 100 MB evict the caches as the other paths of a benchmark round do): one median per session.
    sessions = {f"{name} / session {i}": (lambda run=squeezer.runtime.load(files[name], threads=2, spinning=False): run(feed))
                for i in range(3) for name in ("squeezer w4g128", "ORT MatMulNBits int4")}
    fp32 = squeezer.runtime.load(work / "fp32.onnx", threads=2, spinning=False)
    spread = _interleaved({**sessions, "fp32": lambda: fp32(feed)}, rounds=40, block=3, warm=8)
    spread.pop("fp32")
    for name, value in spread.items():
        print(f"{name:46s} {value:.3f} ms")
    # What bench/peers.py's timing rounds do to these files: untimed calls per turn (1 vs 8) with the
    # other paths of a round in between, and what a PyTorch call just before does to an ONNX call.
    packed_w8 = squeezer.pack(squeezer.quantize(mlp, "w8", progress=False), inplace=True)
    with torch.inference_mode():
        rotation = {**{name: calls[name] for name in files}, "fp32": lambda: fp32(feed),
                    "squeezer w8 packed (PyTorch)": lambda: packed_w8(x)}
        rewarm = {warm: _interleaved(rotation, rounds=40, block=3, warm=warm, shuffle=True) for warm in (1, 8)}
        after: dict[str, list[float]] = {"after squeezer w8 packed (PyTorch)": [], "after ORT MatMulNBits int8": []}
        for _ in range(60):
            for label, before in zip(after, (rotation["squeezer w8 packed (PyTorch)"], calls["ORT MatMulNBits int8"])):
                before()
                for _ in range(8):
                    calls["squeezer w8"]()
                for _ in range(3):
                    t0 = time.perf_counter()
                    calls["squeezer w8"]()
                    after[label].append((time.perf_counter() - t0) * 1e3)
    for warm, medians in rewarm.items():
        print(f"{warm} untimed call(s) per turn:", {k: round(v, 3) for k, v in medians.items() if k in files})
    after_ms = {k: float(np.median(v)) for k, v in after.items()}
    print("squeezer w8 ONNX (8 untimed + 3 timed calls)", {k: round(v, 3) for k, v in after_ms.items()})
    return {"median_ms": ms, "identical_optimized_graphs": same, "calls_per_path": 400,
            "per_session_median_ms": spread, "per_session_calls": 120,
            "rewarm_median_ms": {str(k): v for k, v in rewarm.items()}, "squeezer_w8_onnx_after_ms": after_ms}


MEMORY_PARTS = ("deepcopy", "calibration forwards", "w8 without calib", "w8", "w4g128-gptq", "w4g128-gptq inplace",
                "calibration forwards, batches of 8", "w4g128-gptq, batches of 8", "w4g128-gptq inplace, batches of 8",
                "w4g128-gptq inplace, low-memory", "w4g128-gptq inplace, batches of 8, low-memory")


def memory_part(part: str) -> tuple[int | None, float]:
    """Resident-memory rise of one part in this (fresh) process, bytes, and its seconds; the model's
    memory-mapped weights are paged in first, as in the accuracy bench, where the fp32 model has
    already run. ``low-memory`` parts call :func:`squeezer.memory.limit_heap_retention` first, as
    ``squeezer quantize --low-memory`` does."""
    from accuracy import load_reviews
    from squeezer.memory import limit_heap_retention

    if part.endswith("low-memory") and not limit_heap_retention():
        return None, 0.0
    torch.set_num_threads(2)
    model, tokenizer, _ = load_minilm()
    texts = load_reviews()[0]
    size = 8 if "batches of 8" in part else 32
    calib = [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, 128, size)]
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), PeakMemory() as mem:
        warnings.simplefilter("ignore")
        if part == "deepcopy":
            copy.deepcopy(model)
        elif part.startswith("calibration forwards"):
            for batch in calib:
                model(**batch)
        else:
            preset = part.split()[0].rstrip(",")
            squeezer.quantize(model, preset, calib=None if "without" in part else calib, progress=False,
                              inplace="inplace" in part)
    return mem.extra, time.perf_counter() - start


def probe_memory() -> dict[str, Any]:
    """Each part of :data:`MEMORY_PARTS` in a fresh process (MiniLM, 128 calibration texts in batches of 32,
    or of 8 where the part says so)."""

    fp32_bytes = sum(p.numel() * p.element_size() for p in load_minilm()[0].parameters())
    out, seconds = {}, {}
    for part in MEMORY_PARTS:
        done = subprocess.run([sys.executable, __file__, "memory-part", part], capture_output=True, text=True, check=True)
        extra, seconds[part] = json.loads(done.stdout.strip().splitlines()[-1])
        out[part] = extra
        print(f"{part:45s} +{extra / 2**20:.0f} MiB = {extra / fp32_bytes:.2f}x the fp32 weights, {seconds[part]:.1f} s"
              if extra is not None else f"{part:45s} not measurable here")
    return {"fp32_weight_bytes": fp32_bytes, "peak_extra_bytes": out, "seconds": seconds}


W4Variant = tuple[str, str, dict[str, Any], int, Optional[tuple[int, int]]]
"""(label, preset, algorithm options (per step for a chain), calibration texts, weight grid ``(bits, group)``
instead of the preset's or None)."""


W4_VARIANTS: tuple[W4Variant, ...] = (
    ("w4g128 (RTN)", "w4g128", {}, 128, None),
    ("w4g128-gptq", "w4g128-gptq", {}, 128, None),
    ("w4g128-gptq act_order", "w4g128-gptq", {"act_order": True}, 128, None),
    ("w4g128-gptq clip", "w4g128-gptq", {"clip": True}, 128, None),
    ("w4g128-gptq act_order + clip", "w4g128-gptq", {"act_order": True, "clip": True}, 128, None),
    ("w4g128-gptq, 256 calibration texts", "w4g128-gptq", {}, 256, None),
    ("w4g128-gptq act_order + clip, 256 calibration texts", "w4g128-gptq", {"act_order": True, "clip": True}, 256, None),
    ("w4g128-hadamard (RTN of the rotated weights)", "w4g128-hadamard", {}, 128, None),
    ("w4g128-hadamard+gptq", "w4g128-hadamard+gptq", {}, 128, None),
    ("w4g128-hadamard+gptq act_order + clip", "w4g128-hadamard+gptq", {"gptq": {"act_order": True, "clip": True}}, 128, None),
    ("w4g128-hadamard+gptq, Hadamard blocks of 128", "w4g128-hadamard+gptq", {"hadamard": {"block": 128}}, 128, None),
    ("w4g128-hadamard+gptq, Hadamard blocks of 32", "w4g128-hadamard+gptq", {"hadamard": {"block": 32}}, 128, None),
)
"""The accuracy bench's set-up, one knob at a time."""

W4_CEILING: tuple[W4Variant, ...] = (
    ("w4g128-hadamard+gptq (4 bits, groups of 128)", "w4g128-hadamard+gptq", {}, 128, None),
    ("the same, 4 bits, groups of 64", "w4g128-hadamard+gptq", {}, 128, (4, 64)),
    ("the same, 4 bits, groups of 32", "w4g128-hadamard+gptq", {}, 128, (4, 32)),
    ("the same, 5 bits, groups of 128", "w4g128-hadamard+gptq", {}, 128, (5, 128)),
    ("the same, 6 bits, groups of 128", "w4g128-hadamard+gptq", {}, 128, (6, 128)),
)
"""The best W4 g128 configuration of the accuracy run on finer grids: how much finer a grid the agreement
goal (0.97) takes."""


def probe_w4(variants: tuple[W4Variant, ...]) -> dict[str, Any]:
    """MiniLM W4 g128 variants scored as in docs/accuracy.md (mean / min cosine, head agreement with fp32)."""
    from dataclasses import replace

    from accuracy import minilm_eval, torch_runner
    from squeezer.resolve import resolve_config
    from squeezer.quant.spec import PerGroup, QuantSpec

    torch.set_num_threads(2)
    torch.manual_seed(0)
    ev = minilm_eval(quick=False, n_train=4000)
    rows = []
    for label, preset, options, texts, weights in variants:
        config = resolve_config(preset)
        if options:
            config = replace(config, algorithm_options=options)
        if weights is not None:  # the preset's algorithm and embeddings on another grid: (bits, group size)
            config = replace(config, weight=QuantSpec(bits=weights[0], granularity=PerGroup(weights[1]), symmetric=False),
                             name=f"w{weights[0]}g{weights[1]}-{config.algorithm}")
        calib = ev.calibration(texts)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = squeezer.quantize(ev.model, config, calib=calib, progress=False)
        row = {"variant": label, "preset": preset, "options": options, "calibration_texts": texts,
               "weights_bits_group": weights, "quantize_s": round(time.perf_counter() - start, 1),
               **ev.score(torch_runner(q))}
        rows.append(row)
        print(f"{label:55s} cos {row['mean_cos']:.5f} (min {row['min_cos']:.5f}), agreement {row['agreement']:.4f}, "
              f"{row['quantize_s']:.1f} s")
    return {"test_texts": len(ev.test_x), "rows": rows}


KERNEL_PRESETS = ("w8", "w8a8", "w8a8-tensor", "w8a8-static", "w4g128")
KERNEL_BATCHES = (1, 16)
KERNEL_SECONDS = 10.0
"""Timing budget per (model, preset, batch) of a full run: 20 cases, 200 s nominal (up to twice that on a busy
machine, see :func:`~round_robin.time_round_robin`), plus quantizing and packing: within 8 minutes."""
KERNEL_QUICK_SECONDS = 1.0
KERNEL_MAX_ROUNDS = 1000


def kernel_models(quick: bool) -> dict[str, tuple[nn.Module, list[torch.Tensor], dict[int, torch.Tensor]]]:
    """``{name: (model, calibration batches, {batch: timed input})}``: peers.py's MLP, and (not with ``quick``)
    one seeded ``Linear(4096, 4096)`` with standard normal inputs."""
    timed, calib, _ = mlp_inputs(KERNEL_BATCHES)
    models = {"MLP 1024-4096-4096-1024": (make_mlp(), calib, timed)}
    if not quick:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        models["Linear 4096x4096"] = (nn.Sequential(nn.Linear(4096, 4096)).eval(),
                                      [torch.randn(64, 4096, generator=g) for _ in range(4)],
                                      {b: torch.randn(b, 4096, generator=g) for b in KERNEL_BATCHES})
    return models


def probe_kernel_choice(cache: Path, seconds: float, quick: bool) -> dict[str, Any]:
    """Is a model packed with ``kernels="rule"`` (the default) at least as fast as one packed with
    ``kernels="time"`` (timed on this machine, fresh kernel cache in ``cache``)? Per model, preset and batch,
    the two packed models are timed in one round-robin run (``seconds`` of budget); the verdict reads the 95 %
    interval of the median per-round ratio ``rule ms / time ms``: at or below 1 means "at least as fast"."""
    os.environ["SQUEEZER_CACHE_DIR"] = str(cache)
    torch.set_num_threads(THREADS)
    rows = []
    for model_name, (model, calib, timed) in kernel_models(quick).items():
        for preset in KERNEL_PRESETS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = squeezer.quantize(model, preset, calib=calib, progress=False)
            packed, pack_s = {}, {}
            for choice in ("rule", "time"):
                start = time.perf_counter()
                packed[choice] = squeezer.pack(q, kernels=choice).eval()
                pack_s[choice] = round(time.perf_counter() - start, 3)
            log(f"kernel-choice: {model_name}, {preset}: packed in {pack_s['rule']:.1f}s (rule), "
                f"{pack_s['time']:.1f}s (time)")
            kernels = {choice: packed_kernels(m) for choice, m in packed.items()}
            for b, x in timed.items():
                log(f"kernel-choice: {model_name}, {preset}, batch {b} (~{seconds:.0f}s)")
                with torch.inference_mode():
                    ys = {choice: m(x) for choice, m in packed.items()}
                    calls = {choice: (lambda m=m: m(x)) for choice, m in packed.items()}
                    samples, round_ms, info = time_round_robin(calls, seconds, 3, KERNEL_MAX_ROUNDS)
                paired = paired_rounds(round_ms["rule"], round_ms["time"])
                rows.append({"model": model_name, "preset": preset, "batch": b, "kernels": kernels,
                             "same_kernels": kernels_at(kernels["rule"], b) == kernels_at(kernels["time"], b),
                             "pack_s": pack_s,
                             "median_ms": {c: statistics.median(s) for c, s in samples.items()},
                             "output_rel_diff": float((ys["rule"] - ys["time"]).norm() / ys["time"].norm()),
                             "timing": info, **paired,
                             "rule_at_least_as_fast": paired.get("verdict") in ("faster", "equal within noise")})
    print(kernel_choice_table(rows))
    for r in rows:
        if not r["same_kernels"] and r["batch"] == KERNEL_BATCHES[0]:
            print(f"{r['model']}, {r['preset']}: rule {r['kernels']['rule']}; time {r['kernels']['time']}")
    return {"presets": list(KERNEL_PRESETS), "batches": list(KERNEL_BATCHES), "seconds_per_case": seconds,
            "threads": THREADS, "rows": rows}


def kernels_at(kernels: dict[str, str | list[str]], rows: int) -> dict[str, str]:
    """``{layer: path}`` that runs an input of ``rows`` rows, from :func:`~squeezer.kernels.packed_kernels`."""
    return {layer: k if isinstance(k, str) else k[bucket_of(rows)] for layer, k in kernels.items()}


def kernel_choice_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per model, preset and batch, both medians, the ratio rule / time with its interval, the verdict."""
    lines = table_head(["model", "preset", "batch", "same kernels at this batch", "rule ms", "time ms", "rule / time (95 % interval)",
                        "rounds kept", "rule at least as fast"])
    for r in rows:
        lo, hi = r.get("ratio_ci95", (float("nan"), float("nan")))
        ratio = f"{r['median_ratio']:.3f} ({lo:.3f}-{hi:.3f})" if r.get("rounds") else "no paired rounds"
        lines.append(table_row([r["model"], r["preset"], str(r["batch"]), "yes" if r["same_kernels"] else "no",
                                fmt_ms(r["median_ms"]["rule"]), fmt_ms(r["median_ms"]["time"]), ratio,
                                f"{r['timing']['rounds_kept']} / {r['timing']['rounds']}",
                                "yes" if r["rule_at_least_as_fast"] else "**no**"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=("distill", "same-graph", "memory", "memory-part", "w4", "w4-ceiling",
                                          "kernel-choice"))
    parser.add_argument("part", nargs="?", help="memory-part only (internal)")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"kernel-choice: timing budget per case in seconds (default {KERNEL_SECONDS:g}; "
                             f"--quick {KERNEL_QUICK_SECONDS:g})")
    parser.add_argument("--quick", action="store_true",
                        help="kernel-choice: a smoke run (MLP only, short timing) written under bench/results/quick")
    args = parser.parse_args()
    if (args.quick or args.seconds is not None) and args.probe != "kernel-choice":
        parser.error("--quick and --seconds apply to kernel-choice only")
    if args.probe == "memory-part":
        print(json.dumps(memory_part(args.part)))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = {"distill": probe_distill, "memory": probe_memory, "w4": lambda: probe_w4(W4_VARIANTS),
                  "w4-ceiling": lambda: probe_w4(W4_CEILING),
                  "same-graph": lambda: probe_same_graph(Path(tmp)),
                  "kernel-choice": lambda: probe_kernel_choice(
                      Path(tmp) / "kernel-cache",
                      args.seconds or (KERNEL_QUICK_SECONDS if args.quick else KERNEL_SECONDS), args.quick)}[args.probe]()
    result["machine"] = cpu_info()
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    out = (RESULTS / "quick" if args.quick else RESULTS) / f"probe_{args.probe.replace('-', '_')}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
