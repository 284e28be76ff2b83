"""Compression beyond post-training quantization, measured on the bundled data in one run.

Prints a table and writes ``bench/results/compression.json`` and ``docs/compression.md``:

1. credit MLP: structured 50 % pruning + fine-tune + int8 (recipe ``prune50-int8-finetune``) vs fp32 ROC-AUC;
2. digits CNN: ternary / 2-bit weights, PTQ vs QAT (learned step sizes, ``L = L_task + lam E_quant``);
3. distillation: a digits CNN student with <= 1/4 of the teacher's parameters, with vs without the teacher;
4. SVD of the largest layers to half their parameters + a short fine-tune (digits MLP);
5. the batch-1 (and batch-256) latency of the structurally pruned credit MLP vs the original.

Usage: ``python bench/compression.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import squeezer
from squeezer.distill import distill
from squeezer.examples.credit import evaluate_credit, make_credit_task, train_credit_model
from squeezer.examples.digits import DigitsCNN, digits_accuracy, make_digits_task, train_digits_model
from squeezer.lowrank import low_rank
from squeezer.qat import convert, prepare_qat, qat_loss
from squeezer.recipe import model_size
from squeezer.training import fit

ROOT = Path(__file__).resolve().parent.parent


def credit_prune_int8() -> dict:
    task = make_credit_task(seed=0)
    model = train_credit_model(task, seed=0)
    data = list(zip(task.x_train.split(64), task.y_train.split(64)))
    out = squeezer.compress(model, "prune50-int8-finetune", data=data,
                            evaluate=lambda m: evaluate_credit(m, task)["roc_auc"])
    rows = [{"step": r.step, "params": r.params, "bytes": r.bytes, "roc_auc": r.metric} for r in out.squeezer_compression.rows]
    drop = rows[0]["roc_auc"] - rows[-1]["roc_auc"]
    return {"rows": rows, "auc_drop": drop, "goal": "ROC-AUC within 0.01 of fp32", "met": drop <= 0.01}


def digits_data(task, batch: int = 64) -> list:
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(task.y_train), generator=gen)
    return [(task.x_train[i], task.y_train[i]) for i in idx.split(batch)]


def digits_qat() -> dict:
    task = make_digits_task(seed=0)
    model = train_digits_model(task, seed=0)
    base = digits_accuracy(model, task)
    data = digits_data(task)
    calib = [x for x, _ in data[:8]]
    results = {"fp32": base}
    for preset in ("ternary", "w2g64"):
        ptq = digits_accuracy(squeezer.quantize(model, preset, calib=calib, progress=False), task)
        torch.manual_seed(0)
        q = prepare_qat(model, preset, calib=calib, learnable_scales=preset != "ternary")
        fit(q, data, epochs=8, lr=1e-3,
            loss_fn=lambda out, y: qat_loss(nn.functional.cross_entropy(out, y), q, 0.01)._asdict())
        qat = digits_accuracy(convert(q), task)
        lost = base - ptq
        recovered = (qat - ptq) / lost if lost > 0 else None
        results[preset] = {"ptq": ptq, "qat": qat, "ptq_loss_pt": 100 * lost, "recovered_fraction": recovered}
    best = max((results[p] for p in ("ternary", "w2g64")), key=lambda r: r["ptq_loss_pt"])
    results["goal"] = "QAT recovers at least half of what 2-bit / ternary PTQ loses"
    results["met"] = best["recovered_fraction"] is not None and best["recovered_fraction"] >= 0.5
    return results


def distillation() -> dict:
    task = make_digits_task(seed=0)
    teacher = train_digits_model(task, seed=0, epochs=15)
    data = digits_data(task)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    scores = {}
    for mode in ("without teacher", "with teacher"):
        torch.manual_seed(1)
        student = DigitsCNN(width=4)
        if mode == "with teacher":
            distill(student, teacher, data, epochs=15, alpha=0.3, temperature=4.0, lr=2e-3)
        else:
            fit(student, data, epochs=15, lr=2e-3)
        scores[mode] = digits_accuracy(student.eval(), task)
    ratio = params(DigitsCNN(width=4)) / params(teacher)
    return {"teacher_params": params(teacher), "student_params": params(DigitsCNN(width=4)), "param_ratio": ratio,
            "teacher_accuracy": digits_accuracy(teacher, task), **scores,
            "goal": "student <= 1/4 of the teacher's parameters beats the same student without the teacher",
            "met": ratio <= 0.25 and scores["with teacher"] > scores["without teacher"]}


def svd_half() -> dict:
    task = make_digits_task(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    data = digits_data(task)
    fit(model, data, epochs=15, lr=2e-3)
    model.eval()
    base = digits_accuracy(model, task)
    before = sum(p.numel() for p in model.parameters())
    report = low_rank(model, budget=0.5, min_params=10_000)
    after_svd = digits_accuracy(model, task)
    fit(model, data, epochs=2, lr=5e-4)
    tuned = digits_accuracy(model.eval(), task)
    return {"fp32": base, "after_svd": after_svd, "after_finetune": tuned, "params_before": before,
            "params_after": sum(p.numel() for p in model.parameters()), "layers": report.to_dict(),
            "goal": "SVD at half the parameters of the largest layers + short fine-tune within 1 pt",
            "met": base - tuned <= 0.01}


def median_latency(model: nn.Module, x: torch.Tensor, rounds: int) -> float:
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pruning_speed() -> dict:
    task = make_credit_task(seed=0)
    model = train_credit_model(task, seed=0)
    pruned = squeezer.compress(model, [{"prune": {"kind": "structured", "sparsity": 0.5}}])
    out = {"params": model_size(model)[0], "pruned_params": model_size(pruned)[0]}
    for batch, rounds in ((1, 3000), (256, 300)):
        x = task.x_test[:1].repeat(batch, 1)
        timings = {"fp32": [], "pruned": []}
        for _ in range(5):  # interleaved rounds: machine noise hits both alike
            timings["fp32"].append(median_latency(model, x, rounds // 5))
            timings["pruned"].append(median_latency(pruned, x, rounds // 5))
        fp, pr = statistics.median(timings["fp32"]), statistics.median(timings["pruned"])
        out[f"batch{batch}"] = {"fp32_us": fp * 1e6, "pruned_us": pr * 1e6, "speedup": fp / pr}
    return out


def markdown(results: dict) -> str:
    c, q, d, s, p = (results[k] for k in ("credit", "qat", "distill", "svd", "speed"))
    yes = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    lines = [
        "# Compression beyond post-training quantization",
        "",
        "Produced by `python bench/compression.py` (bundled data, seeded; "
        f"{results['machine']['cpu']}, torch {results['machine']['torch']}, {results['machine']['threads']} threads, "
        f"{results['machine']['date']}). Raw figures: `bench/results/compression.json`.",
        "",
        "## Credit model: structured 50 % pruning + fine-tune + int8 (`prune50-int8-finetune`)",
        "",
        "| step | params | bytes | ROC-AUC |",
        "|---|---|---|---|",
        *[f"| {r['step']} | {r['params']:,} | {r['bytes']:,} | {r['roc_auc']:.4f} |" for r in c["rows"]],
        "",
        f"ROC-AUC drop {c['auc_drop']:+.4f} (goal: within 0.01): {yes(c['met'])}.",
        "",
        "## Digits CNN: 2-bit / ternary weights, PTQ vs QAT",
        "",
        "| weights | PTQ accuracy | QAT accuracy | PTQ loss (pt) | share of the loss QAT recovers |",
        "|---|---|---|---|---|",
        *[f"| {k} | {q[k]['ptq']:.4f} | {q[k]['qat']:.4f} | {q[k]['ptq_loss_pt']:.2f} | "
          f"{'-' if q[k]['recovered_fraction'] is None else format(q[k]['recovered_fraction'], '.2f')} |"
          for k in ("ternary", "w2g64")],
        "",
        f"fp32 accuracy {q['fp32']:.4f}. QAT: 8 epochs from the fp32 weights, lam = 0.01 "
        f"(learned step sizes for w2g64). Goal (recover at least half of the PTQ loss): {yes(q['met'])}.",
        "",
        "## Distillation (digits)",
        "",
        f"Teacher {d['teacher_params']:,} params (accuracy {d['teacher_accuracy']:.4f}); student "
        f"{d['student_params']:,} params ({d['param_ratio']:.2f} of the teacher). Student accuracy without the "
        f"teacher {d['without teacher']:.4f}, with it {d['with teacher']:.4f}: {yes(d['met'])}.",
        "",
        "## SVD of the largest layers to half their parameters (digits MLP)",
        "",
        f"Params {s['params_before']:,} -> {s['params_after']:,}; accuracy fp32 {s['fp32']:.4f}, after SVD "
        f"{s['after_svd']:.4f}, after a 2-epoch fine-tune {s['after_finetune']:.4f} (goal: within 1 pt): {yes(s['met'])}.",
        "",
        "## Structured pruning speed (credit MLP, 50 % of hidden neurons)",
        "",
        f"Params {p['params']:,} -> {p['pruned_params']:,}.",
        "",
        "| batch | fp32 (µs) | pruned (µs) | speed-up |",
        "|---|---|---|---|",
        *[f"| {b} | {p[f'batch{b}']['fp32_us']:.1f} | {p[f'batch{b}']['pruned_us']:.1f} | ×{p[f'batch{b}']['speedup']:.2f} |"
          for b in (1, 256)],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    results = {"machine": {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "date": time.strftime("%Y-%m-%d")}}
    for key, fn in (("credit", credit_prune_int8), ("qat", digits_qat), ("distill", distillation),
                    ("svd", svd_half), ("speed", pruning_speed)):
        start = time.perf_counter()
        results[key] = fn()
        print(f"{key}: {time.perf_counter() - start:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (ROOT / "docs" / "compression.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
