"""The goals per exported squeezer model, and the best runtime per model, from a model's saved entry."""

from __future__ import annotations

from typing import Any

SIZE_GOAL = 3.5
ACC_TOL_PT = 0.2
NO_WORSE_TOL_PT = 0.005         # "no worse": Δ >= 0 at the precision the tables show (0.01 pt)


def goals(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per exported squeezer model: accuracy vs squeezer's PyTorch model of the same config (packed;
    the simulated one alongside), vs each int8 peer of the same runtime (the goal: its default ones), and the
    file size vs the same format's fp32 export."""
    rows = []
    twins = {(p["config"], p["family"]): p for p in entry["paths"] if p["runtime"] == "PyTorch"}
    fp32 = {p["runtime"]: p for p in entry["paths"] if p["family"] == "fp32"}
    metrics = entry["goal_metrics"]
    for p in entry["paths"]:
        if p["family"] != "squeezer" or p["runtime"] == "PyTorch":
            continue
        row: dict[str, Any] = {"path": p["name"], "runtime": p["runtime"], "config": p["config"]}
        if p["error"] or not p.get("metrics"):
            row["error"] = p["error"] or p.get("eval_error") or "not evaluated"
            rows.append(row)
            continue
        subset = p.get("subset_refs")  # a slow path evaluated on the first eval_n inputs: compare on those
        if subset is not None:
            row["eval_n"] = p["eval_n"]

        def ref_metrics(q: dict[str, Any] | None) -> dict[str, float] | None:
            if q is None:
                return None
            return subset.get(f"{q['name']} | {q['runtime']}") if subset is not None else q.get("metrics")
        for family, key in (("squeezer", "vs_squeezer_torch"), ("squeezer-sim", "vs_squeezer_sim")):
            other = ref_metrics(twins.get((p["config"], family)))
            if other:
                row[key] = {m: p["metrics"][m] - other[m] for m in metrics}
        if "vs_squeezer_torch" in row:
            row["within_0_2pt"] = all(abs(d) <= ACC_TOL_PT + 1e-9 for d in row["vs_squeezer_torch"].values())
        if "vs_squeezer_sim" in row:
            row["within_0_2pt_sim"] = all(abs(d) <= ACC_TOL_PT + 1e-9 for d in row["vs_squeezer_sim"].values())
        row["vs_peers"] = {q["name"]: {m: p["metrics"][m] - ref_metrics(q)[m] for m in metrics}
                           for q in entry["paths"] if q["family"] == "peer" and q["runtime"] == p["runtime"] and ref_metrics(q)}
        defaults = [q for q in entry["paths"] if q.get("default_peer") and q["runtime"] == p["runtime"]]
        row["default_peers"] = [q["name"] for q in defaults]
        if any(not ref_metrics(q) for q in defaults):
            row["no_worse_than_peers"] = None
            row["peer_missing"] = [q["name"] for q in defaults if not ref_metrics(q)]
        elif defaults:
            row["no_worse_than_peers"] = all(row["vs_peers"][q["name"]][m] >= -NO_WORSE_TOL_PT for q in defaults for m in metrics)
        f = fp32.get(p["runtime"])
        if f and f.get("size_bytes") and p.get("size_bytes"):
            row["size_ratio"] = f["size_bytes"] / p["size_bytes"]
            row["size_goal"] = row["size_ratio"] >= SIZE_GOAL
            if p.get("payload_bytes"):  # the ratio if this file's overhead were its fp32 export's
                before, after = p["payload_bytes"]
                row["size_ratio_same_overhead"] = f["size_bytes"] / (after + f["size_bytes"] - before)
        rows.append(row)
    return rows


def best_runtime(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The squeezer int8 deployment with the lowest batch-1 p99 (over both thread counts) among those whose
    accuracy is within 0.2 pt of squeezer's PyTorch model (the PyTorch model itself included)."""
    ok = {(g["path"], g["runtime"]) for g in entry["goals"] if g.get("within_0_2pt")}
    cands = []
    for p in entry["paths"]:
        if p["family"] != "squeezer" or p["error"] or not p.get("latency"):
            continue
        if p["runtime"] != "PyTorch" and (p["name"], p["runtime"]) not in ok:
            continue
        for t, lat in p["latency"].items():
            if "p99_ms" in lat:
                cands.append((lat["p99_ms"], t, p))
    if not cands:
        return None
    p99, t, p = min(cands, key=lambda c: c[0])
    fastest_any = min(((lat["p99_ms"], t2, q) for q in entry["paths"] if q.get("latency") and not q["error"]
                       for t2, lat in q["latency"].items() if "p99_ms" in lat), key=lambda c: c[0])
    return {"path": p["name"], "runtime": p["runtime"], "config": p["config"], "threads": int(t), "p99_ms": p99,
            "median_ms": p["latency"][t]["median_ms"], "metrics": p["metrics"],
            "fastest_any": {"path": fastest_any[2]["name"], "runtime": fastest_any[2]["runtime"], "threads": int(fastest_any[1]),
                            "p99_ms": fastest_any[0], "family": fastest_any[2]["family"]}}
