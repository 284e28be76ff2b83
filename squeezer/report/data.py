"""The report data of ``quantize``, ``compress`` and ``search`` runs (what :mod:`.html` renders and
``report_data.json`` holds) and the robustness section (task metrics: :mod:`squeezer.task_metrics`).

Every run's data opens with ``about`` (model class, preset or strategy, date, squeezer and torch
versions) and a one-line ``headline``.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..task_metrics import task_metric
from ..transform import report_of
from ..version import __version__
from .quant import QuantReport, ratio_text

if TYPE_CHECKING:
    from ..search.session import SearchRun


def about(model_class: str, **fields: Any) -> dict[str, Any]:
    """The header of a report: model class, the run's own ``fields``, local date and time, versions."""
    return {"model": model_class, **fields, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "squeezer": __version__, "torch": torch.__version__}


def _percent(share: float | None) -> str | None:
    return None if share is None else f"{100 * share:.3g}%"


def quant_report_data(report: QuantReport, task: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Report data of a ``quantize`` run: ``about`` (with ``before quantizing``: the batch norms folded and biases
    corrected, when any), ``headline``, ``summary``, ``layers``, ``config``.

    ``task``: ``{metric name: {"before": float model's value, "after": quantized model's}}`` (``--eval``).
    Bits per weight before = ``8 * float weight bytes / #quantized weights``; the SQNRs exist only after.
    Layers left in float close the table with their share of the model's parameters.
    """
    d = report.to_dict()
    s = d["summary"]
    params = sum(layer.params for layer in report.layers)
    before = {"model bytes": s["model_bytes_before"], "quantized weight bytes": s["weight_bytes_before"],
              "bits per weight": 8 * s["weight_bytes_before"] / max(params, 1)}
    after = {"model bytes": s["model_bytes_after"], "quantized weight bytes": s["weight_bytes_after"],
             "bits per weight": s["bits_per_weight"], "weight SQNR dB": s["weight_sqnr_db"]}
    if s["model_output_error"] is not None:
        after["model output SQNR dB"] = s["model_output_error"]["sqnr_db"]
    if task:
        before["task"] = {name: v["before"] for name, v in task.items()}
        after["task"] = {name: v["after"] for name, v in task.items()}
    layers = [_layer_row(row) for row in d["layers"]]
    layers += [{"name": r["name"], "kind": r["kind"], "format": "float", "params": r["params"],
                "share_of_model_params": _percent(r["param_share"]), "skipped": r["reason"]} for r in d["skipped"]]
    name = report.config.get("name", "custom")
    return {"title": f"squeezer quantize: {report.model_class or 'model'}, {name}",
            "about": about(report.model_class, preset=name, **_float_changes(report)), "headline": report.headline(),
            "summary": {"before": before, "after": after}, "layers": layers, "config": d["config"]}


def _float_changes(report: QuantReport) -> dict[str, str]:
    """``{"before quantizing": ...}`` (:meth:`QuantReport.float_changes`), empty when nothing was changed."""
    changes = report.float_changes()
    return {} if changes is None else {"before quantizing": changes}


def _layer_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {key: row[key] for key in ("name", "kind", "format", "activation", "params", "bytes_before", "bytes_after")}
    out["smaller"] = ratio_text(row["bytes_before"], row["bytes_after"])
    out["bits_per_weight"] = 8 * row["bytes_after"] / max(row["params"], 1)
    out["weight_sqnr_db"] = row["weight_error"]["sqnr_db"]
    if row["output_error"] is not None:
        out["output_sqnr_db"] = row["output_error"]["sqnr_db"]
    return out


def compression_data(report: dict[str, Any], title: str) -> dict[str, Any]:
    """Report data of a ``compress`` run: before = the baseline row, after = the last row, and every
    step's row as the table."""
    rows = report["rows"]
    pick = ("params", "nonzero_params", "bytes", "metric")
    return {"title": title, "summary": {"before": {k: rows[0][k] for k in pick}, "after": {k: rows[-1][k] for k in pick}},
            "layers": rows}


def search_data(run: SearchRun) -> dict[str, Any]:
    """Report data of a ``search`` run: before / after summary, the chosen model's layers (with the
    sensitivity of the chosen format; layers kept in float last), sensitivities, trials, config."""
    sens, choice = run.sensitivity, run.config["choice"]
    layers = [{"name": l.name, "format": l.format, "params": l.params, "bytes": l.bytes_after,
               "weight_sqnr_db": l.weight_error.sqnr_db,
               "output_sqnr_db": None if l.output_error is None else l.output_error.sqnr_db,
               "sensitivity": sens.rel_mse.get(l.name, {}).get(choice.get(l.name, ""))}
              for l in report_of(run.model, QuantReport).layers]
    layers += [{"name": n, "format": "fp32", "params": sens.params[n], "bytes": sens.bytes[n]["fp32"],
                "sensitivity": 0.0} for n, f in choice.items() if f == "fp32" and n in sens.params]
    before, after = run.summary["before"]["bytes"], run.summary["after"]["bytes"]
    return {
        "title": "squeezer search",
        "about": about(type(run.model).__name__, strategy=run.config["strategy"]),
        "headline": f"model {before:,} -> {after:,} bytes ({ratio_text(before, after)})",
        "summary": run.summary,
        "layers": layers,
        "sensitivity": {"formats": sens.formats, "layers": sens.rel_mse},
        "pareto": run.pareto,
        "config": run.config,
        "extra": {"sensitivity_seconds": sens.seconds, "sensitivity_from_cache": sens.from_cache, **run.extra},
    }


def add_robustness(data: dict[str, Any], models: dict[str, nn.Module], batches: list[tuple[Tensor, Tensor]],
                   metric: str, feature_names: list[str] | None = None) -> dict[str, Any]:
    """``data`` with a ``robustness`` section measured on ``(x, y)`` batches."""
    from ..robustness import robustness

    data["robustness"] = robustness(models, batches, task_metric(metric), feature_names=feature_names)
    return data
