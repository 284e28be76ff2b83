"""One model's run: build its paths, evaluate, time at each thread count, serve (fraud), goals; merging
saved results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import log
from deployment.evaluate import evaluate
from deployment.goals import best_runtime, goals
from deployment.paths import BUILD_LIMIT_S, DPath, fp32_paths, squeezer_paths
from deployment.peers import peer_paths
from deployment.runtimes import EVAL_THREADS, set_threads
from deployment.tasks import Task
from deployment.timing import serve_fraud, time_paths

THREADS = (1, 2)


def build_paths(task: Task, work: Path) -> list[DPath]:
    """fp32, squeezer and peer paths of ``task``, files under ``work`` (failures kept with their error)."""
    limit = BUILD_LIMIT_S.get(task.name, 300)
    log(f"{task.title}: building paths")
    paths = fp32_paths(task, work, limit)
    fp32_onnx = work / "fp32.onnx"
    paths += squeezer_paths(task, work, limit)
    paths += peer_paths(task, work, limit, fp32_onnx if fp32_onnx.exists() else None)
    return paths


def path_record(p: DPath, ev: dict[str, Any]) -> dict[str, Any]:
    """A path's entry in the results: what was built, and its evaluation ``ev`` (latency filled in later)."""
    rec = {"name": p.name, "runtime": p.runtime, "family": p.family, "config": p.config, "timed": p.timed,
           "file": p.file, "size_bytes": p.size_bytes, "size_what": p.size_what, "warnings": p.warnings,
           "layers": p.layers, "note": p.note, "carries": p.carries, "error": p.error, "build_s": round(p.build_s, 2),
           "default_peer": p.default_peer, "payload_bytes": p.payload_bytes,
           "latency": {}}
    if "error" in ev:
        rec["eval_error"] = ev["error"]
    for k in ("metrics", "rel_l2_vs_fp32", "rel_l2_vs_squeezer_torch", "rel_l2_vs_squeezer_sim", "eval_s", "eval_n",
              "subset_refs"):
        if k in ev:
            rec[k] = ev[k]
    return rec


def bench_task(task: Task, work: Path, calls: int, serve_requests: int, wait_s: float = 0.0) -> dict[str, Any]:
    """One model's entry in the results: its paths evaluated, timed at each of ``THREADS``, served (fraud),
    with its goals and best runtime."""
    set_threads(EVAL_THREADS)
    paths = build_paths(task, work)
    log(f"{task.title}: evaluating {sum(p.make is not None for p in paths)} paths on {len(task.eval_inputs)} inputs")
    ev = evaluate(task, paths)
    entry: dict[str, Any] = {"name": task.name, "title": task.title, "input": task.input_desc,
                             "goal_metrics": list(task.goal_metrics), "threads": list(THREADS), "timing": {},
                             "paths": [path_record(p, ev.get(p.key, {})) for p in paths]}
    for p in paths:  # a path that failed evaluation is not timed
        if "error" in ev.get(p.key, {}):
            p.make = None
    for t in THREADS:
        log(f"{task.title}: timing {sum(p.make is not None and p.timed for p in paths)} paths at {t} thread(s), {calls} calls each")
        stats, info = time_paths(task, paths, calls, t, wait_s)
        entry["timing"][str(t)] = info
        log(f"  other processes used {info['foreign_cores']} cores on average")
        for p, rec in zip(paths, entry["paths"]):
            if p.key in stats:
                rec["latency"][str(t)] = stats[p.key]
    if "fraud" in task.extra:
        entry["serving"] = {"runs": {}, "stats": {}}
        for t in THREADS:
            log(f"{task.title}: serving loop at {t} thread(s), {serve_requests} requests per path")
            stats, info = serve_fraud(task, paths, t, serve_requests, wait_s)
            entry["serving"]["runs"][str(t)] = info
            entry["serving"]["stats"][str(t)] = stats
    entry["goals"] = goals(entry)
    entry["best"] = best_runtime(entry)
    set_threads(EVAL_THREADS)
    return entry


def merge_saved(result: dict[str, Any], saved: dict[str, Any]) -> None:
    """``--merge``: the models of ``saved`` not run now join ``result`` (in the canonical order), each
    dated by its own run; ``result["kept"]`` says which, from which run, with that run's versions."""
    run_now = result["models"]
    kept = {name: entry for name, entry in saved["models"].items() if name not in run_now}
    for entry in kept.values():
        entry.setdefault("date", saved["machine"]["date"])
    result["kept"] = {"models": list(kept), "versions": saved["machine"]["versions"],
                      "dates": sorted({e["date"] for e in kept.values()})}
    order = ("credit", "digits", "fraud", "minilm")
    result["models"] = {n: (run_now.get(n) or kept[n]) for n in order if n in run_now or n in kept}
