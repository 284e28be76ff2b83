"""`squeezer demo`: train the bundled credit-scoring MLP, quantize it with every preset,
and compare size and accuracy with fp32 on the held-out split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..api import quantize
from ..config import PRESETS
from ..report.quant import QuantReport
from ..transform import report_of
from .credit import evaluate_credit, make_credit_task, train_credit_model

DEMO_SCHEMA_KEYS = ("preset", "format", "bits_per_weight", "weight_bytes", "compression", "accuracy",
                    "roc_auc", "accuracy_delta_pt", "roc_auc_delta", "weight_sqnr_db")


def run_demo(seed: int = 0, presets: list[str] | None = None,
             on_step: Callable[[str, dict[str, Any] | None], None] | None = None) -> dict[str, Any]:
    """Returns ``{"dataset", "model", "fp32", "rows"}``; each row has :data:`DEMO_SCHEMA_KEYS`.

    ``on_step(message, row)`` is called before each step with ``row=None`` (training, then each
    preset) and after each preset with its finished row."""
    step = on_step or (lambda message, row: None)
    torch.manual_seed(seed)
    step("training the credit-scoring MLP", None)
    task = make_credit_task(seed=seed)
    model = train_credit_model(task, seed=seed)
    base = evaluate_credit(model, task)
    calib = list(task.x_train.split(64))
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = [{
        "preset": "fp32", "format": "float32", "bits_per_weight": 32.0, "weight_bytes": weight_bytes,
        "compression": 1.0, **base, "accuracy_delta_pt": 0.0, "roc_auc_delta": 0.0, "weight_sqnr_db": None,
    }]
    names = presets or list(PRESETS)
    for i, name in enumerate(names, 1):
        step(f"quantizing with preset {name} ({i}/{len(names)})", None)
        q = quantize(model, name, calib=calib, progress=False)
        report = report_of(q, QuantReport)
        metrics = evaluate_credit(q, task)
        rows.append({
            "preset": name, "format": report.layers[0].format, "bits_per_weight": report.bits_per_weight,
            "weight_bytes": report.weight_bytes_after, "compression": report.weight_compression, **metrics,
            "accuracy_delta_pt": 100 * (metrics["accuracy"] - base["accuracy"]),
            "roc_auc_delta": metrics["roc_auc"] - base["roc_auc"], "weight_sqnr_db": report.weight_sqnr_db,
        })
        step(name, rows[-1])
    return {
        "dataset": {"name": "German credit (Statlog, UCI, CC BY 4.0)", "train_rows": len(task.y_train),
                    "test_rows": len(task.y_test), "features": len(task.feature_names)},
        "model": {"type": type(model).__name__, "params": sum(p.numel() for p in model.parameters())},
        "fp32": base,
        "rows": rows,
    }
