"""One self-contained HTML page from report data: data in, HTML out. Tables, and plots embedded as
base64 PNG (matplotlib, Agg canvas, imported only when a plot is drawn).

The page needs no network: no external CSS, fonts, scripts or images. Its input is a plain dict
(:mod:`squeezer.report.data` builds it); every section is optional and rendered only when its key
is present:

* ``"title"``: the page title (default ``"squeezer report"``);
* ``"about"``: ``{field: value}`` (model, preset, date, versions) -> a table under the title;
* ``"headline"``: one sentence (the whole model's bytes before -> after) -> a paragraph;
* ``"summary"``: ``{"before": {...}, "after": {...}}`` (size in bytes, latency in ms, metrics;
  nested dicts are flattened to dotted names) -> one row per quantity with ``after / before``;
* ``"layers"``: a list of per-layer dicts -> a table with every column present in any row;
* ``"sensitivity"``: ``{"formats": [...], "layers": {layer: {format: value}}}`` -> a table and a
  grouped horizontal bar chart (log axis when all values are positive and span >= 2 decades);
* ``"pareto"``: ``{"x": label, "y": label, "trials": [{"x", "y", "front", "chosen", "params"}]}``
  -> a scatter of all trials, the front highlighted and connected, the chosen trial starred, and
  a table of the front;
* ``"robustness"``: the dict of :func:`squeezer.robustness.robustness` -> a per-model summary,
  line plots of the metric vs noise sigma and vs eps (FGSM / PGD / transfer), the most harmful
  feature shifts and the models skipped by white-box attacks;
* ``"config"`` / ``"extra"``: pretty JSON in a ``<details>``.

All text is escaped; numbers are formatted (ints with thousands separators, floats to 4
significant digits, non-finite floats as ``inf`` / ``-inf`` / ``nan``). Every plot is a
``<figure>`` with an ``alt`` text and a caption.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Iterable
from io import BytesIO
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..io.atomic import atomic_write
from .json import dumps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""
ATTACKS = (("fgsm", "FGSM"), ("pgd", "PGD"), ("transfer", "transfer"))
DECADES = 2  # log axis when max / min >= 10 ** DECADES


def render_html(data: dict[str, Any]) -> str:
    """The whole page for ``data`` (sections described in the module docstring)."""
    if not isinstance(data, dict):
        raise DataError(f"report data must be a dict, got {type(data).__name__}")
    title = _esc(data.get("title", "squeezer report"))
    body = "".join(render(data[key]) for key, render in SECTIONS if key in data)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}</body>\n</html>\n")


def write_html(data: dict[str, Any], path: str | Path) -> Path:
    """Render ``data`` and write it to ``path`` atomically (temporary sibling + rename)."""
    path = Path(path)
    text = render_html(data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    except OSError as exc:
        raise DataError(f"cannot write the HTML report {path}: {exc.strerror or exc}") from None
    return path


# -- formatting ------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    """Plain text for one value: ints ``1,234``, floats 4 significant digits, ``inf`` / ``nan``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return f"{int(value):,}"
    if isinstance(value, Real):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if 1e4 <= abs(v) < 1e15 else f"{v:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return dumps(value, indent=None, default=str)
    return str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def _table(headers: list[str] | None, rows: Iterable[list[Any]]) -> str:
    """A table; ``headers=None``: no header row."""
    head = "" if headers is None else "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr></thead>\n"
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n{head}<tbody>\n{body}</tbody>\n</table>\n"


def _cell(value: Any) -> str:
    return f"<td class=\"num\">{_esc(_fmt(value))}</td>" if _is_number(value) else f"<td>{_esc(_fmt(value))}</td>"


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of any row, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _section(title: str, content: str) -> str:
    return f"<section>\n<h2>{_esc(title)}</h2>\n{content}</section>\n"


def _require(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"report data {where} must be a {names}, got {type(value).__name__}")
    return value


# -- plots -----------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure_html(fig: Figure, alt: str, caption: str) -> str:
    """``<figure>`` with the figure as an inline base64 PNG."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<figure>\n<img src=\"{src}\" alt=\"{_esc(alt)}\">\n<figcaption>{_esc(caption)}</figcaption>\n</figure>\n"


def _finite_values(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if _is_number(v) and math.isfinite(float(v))]


def _spans_decades(values: Iterable[Any]) -> bool:
    """All positive and ``max / min >= 10 ** DECADES``: a log axis reads better."""
    v = _finite_values(values)
    return bool(v) and min(v) > 0 and max(v) / min(v) >= 10 ** DECADES


def _series(ax: Any, x: list[float], lines: dict[str, list[Any]], colors: dict[str, str]) -> None:
    """One line per model (colors fixed per model across plots); non-finite points are gaps."""
    for label, values in lines.items():
        ys = [float(v) if _is_number(v) else math.nan for v in values]
        ax.plot(x, ys, marker="o", label=label, color=colors[label])
    ax.grid(alpha=0.3)


# -- sections --------------------------------------------------------------------------------

def _about(fields: dict[str, Any]) -> str:
    """A two-column table under the title: model, preset, date, versions."""
    _require(fields, dict, "'about'")
    return _table(None, ([key, value] for key, value in fields.items()))


def _headline(text: str) -> str:
    return f"<p><b>{_esc(text)}</b></p>\n"


def _summary(summary: dict[str, Any]) -> str:
    """One row per quantity: before, after, ``after / before``."""
    _require(summary, dict, "'summary'")
    before = _flatten(_require(summary.get("before", {}), dict, "'summary.before'"))
    after = _flatten(_require(summary.get("after", {}), dict, "'summary.after'"))
    rows = [[key, before.get(key), after.get(key), _ratio(before.get(key), after.get(key))]
            for key in dict.fromkeys([*before, *after])]
    return _section("Summary", _table(["quantity", "before", "after", "after / before"], rows))


def _ratio(before: Any, after: Any) -> float | None:
    if not (_is_number(before) and _is_number(after)) or before == 0:
        return None
    return float(after) / float(before)


def _layers(layers: list[dict[str, Any]]) -> str:
    rows = [_flatten(_require(row, dict, "'layers' rows")) for row in _require(layers, list, "'layers'")]
    columns = _columns(rows)
    return _section("Layers", _table([c.replace("_", " ") for c in columns],
                                     ([row.get(c) for c in columns] for row in rows)))


def _sensitivity(sens: dict[str, Any]) -> str:
    """Table layer x format, and a grouped horizontal bar chart of the same values."""
    _require(sens, dict, "'sensitivity'")
    layers = _require(sens.get("layers", {}), dict, "'sensitivity.layers'")
    for values in layers.values():
        _require(values, dict, "'sensitivity.layers' values")
    formats = list(sens.get("formats") or _columns(list(layers.values())))
    table = _table(["layer", *formats], ([name, *(values.get(f) for f in formats)] for name, values in layers.items()))
    if not layers or not formats:
        return _section("Sensitivity", table)
    fig = _new_figure(8, 1.2 + 0.25 * len(layers) * max(len(formats), 2))
    ax = fig.add_subplot()
    height = 0.8 / len(formats)
    names = list(layers)
    for j, fmt in enumerate(formats):
        pos = [i + (j - (len(formats) - 1) / 2) * height for i in range(len(names))]
        ax.barh(pos, [_float_or_nan(layers[n].get(fmt)) for n in names], height=height, label=str(fmt), color=f"C{j}")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    all_values = [v for values in layers.values() for v in values.values()]
    if _spans_decades(all_values):
        ax.set_xscale("log")
    ax.set_xlabel("sensitivity")
    ax.legend(title="format", fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    plot = _figure_html(fig, f"Horizontal bar chart of the sensitivity of {len(names)} layers to formats "
                             f"{', '.join(map(str, formats))}",
                        "Sensitivity per layer and format (bars grouped by layer; larger means the layer suffers more).")
    return _section("Sensitivity", plot + table)


def _float_or_nan(value: Any) -> float:
    return float(value) if _is_number(value) and math.isfinite(float(value)) else math.nan


def _pareto(pareto: dict[str, Any]) -> str:
    """Scatter of all trials, the front connected, the chosen trial starred; a table of the front."""
    _require(pareto, dict, "'pareto'")
    trials = [_require(t, dict, "'pareto.trials' items") for t in _require(pareto.get("trials", []), list,
                                                                          "'pareto.trials'")]
    xlabel, ylabel = str(pareto.get("x", "x")), str(pareto.get("y", "y"))
    front = sorted((t for t in trials if t.get("front")), key=lambda t: _float_or_nan(t.get("x")))
    params = _columns([_flatten(t.get("params") or {}) for t in front])
    table = _table([xlabel, ylabel, "chosen", *params],
                   ([t.get("x"), t.get("y"), bool(t.get("chosen")), *(_flatten(t.get("params") or {}).get(p)
                                                                         for p in params)] for t in front))
    if not trials:
        return _section("Pareto front", "<p>No trials.</p>\n")
    fig = _new_figure(7, 4.5)
    ax = fig.add_subplot()
    ax.scatter([_float_or_nan(t.get("x")) for t in trials], [_float_or_nan(t.get("y")) for t in trials],
               color="0.65", s=18, label=f"trials ({len(trials)})")
    if front:
        ax.plot([_float_or_nan(t.get("x")) for t in front], [_float_or_nan(t.get("y")) for t in front],
                color="C0", marker="o", label=f"Pareto front ({len(front)})")
    chosen = [t for t in trials if t.get("chosen")]
    if chosen:
        ax.scatter([_float_or_nan(t.get("x")) for t in chosen], [_float_or_nan(t.get("y")) for t in chosen],
                   marker="*", s=260, color="C3", edgecolor="k", zorder=3, label="chosen")
    if _spans_decades(t.get("x") for t in trials):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    plot = _figure_html(fig, f"Scatter plot of {ylabel} vs {xlabel} for {len(trials)} trials, "
                             f"{len(front)} on the Pareto front, {len(chosen)} chosen",
                        f"Trials by {xlabel} and {ylabel}: the Pareto front is connected, the chosen trial starred.")
    return _section("Pareto front", plot + "<h3>Trials on the front</h3>\n" + table)


def _robustness(rob: dict[str, Any]) -> str:
    """Per-model summary, metric vs noise sigma and vs eps, harmful feature shifts, skipped models."""
    _require(rob, dict, "'robustness'")
    metric = str(rob.get("metric_name", "metric"))
    noise, adv = rob.get("noise") or {}, rob.get("adversarial") or {}
    labels = list(dict.fromkeys([*rob.get("clean", {}), *noise.get("models", {}),
                                 *(label for kind, _ in ATTACKS for label in adv.get(kind, {}))]))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    parts = [f"<p>Metric: {_esc(metric)}"
             + (f", {_esc(_fmt(rob['n_samples']))} samples" if "n_samples" in rob else "") + ".</p>\n",
             _robustness_table(rob, labels), _noise_plot(noise, metric, colors), _attack_plot(adv, metric, colors),
             _shift_table(rob.get("feature_shift"), rob.get("clean", {}))]
    skipped = rob.get("skipped") or {}
    if skipped:
        items = "".join(f"<li><b>{_esc(label)}</b>: {_esc(reason)}</li>\n" for label, reason in skipped.items())
        parts.append(f"<h3>Skipped by white-box attacks</h3>\n<ul>\n{items}</ul>\n")
    return _section("Robustness", "".join(parts))


def _last(values: list[Any] | None) -> Any:
    return values[-1] if values else None


def _robustness_table(rob: dict[str, Any], labels: list[str]) -> str:
    """Per model: clean metric and the metric at the largest sigma / eps of each perturbation."""
    noise, adv = rob.get("noise") or {}, rob.get("adversarial") or {}
    headers, columns = ["model", "clean"], [lambda label: rob.get("clean", {}).get(label)]
    if noise.get("sigmas"):
        headers.append(f"noise sigma={_fmt(noise['sigmas'][-1])}")
        columns.append(lambda label: _last(noise.get("models", {}).get(label)))
    for kind, name in [(kind, name) for kind, name in ATTACKS if adv.get("eps") and adv.get(kind)]:
        headers.append(f"{name} eps={_fmt(adv['eps'][-1])}")
        columns.append(lambda label, kind=kind: _last(adv.get(kind, {}).get(label)))
    return _table(headers, ([label, *(col(label) for col in columns)] for label in labels))


def _noise_plot(noise: dict[str, Any], metric: str, colors: dict[str, str]) -> str:
    sigmas, lines = noise.get("sigmas") or [], noise.get("models") or {}
    if not sigmas or not lines:
        return ""
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    _series(ax, sigmas, lines, colors)
    ax.set_xlabel("Gaussian noise sigma (x per-feature std)")
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")
    return _figure_html(fig, f"Line plot of {metric} vs Gaussian noise sigma, one line per model: {', '.join(lines)}",
                        f"{metric} under Gaussian noise x + sigma * std * N(0, 1) (same noise for every model).")


def _attack_plot(adv: dict[str, Any], metric: str, colors: dict[str, str]) -> str:
    """One panel per attack that has results (FGSM, PGD, transfer), sharing the metric axis."""
    eps = adv.get("eps") or []
    kinds = [(kind, name) for kind, name in ATTACKS if adv.get(kind)]
    if not eps or not kinds:
        return ""
    fig = _new_figure(4 * len(kinds) + 1, 4)
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, (kind, name) in zip(axes, kinds):
        _series(ax, eps, adv[kind], colors)
        source = f" from {adv['source']}" if kind == "transfer" and "source" in adv else ""
        ax.set_title(f"{name}{source}")
        ax.set_xlabel("eps (x per-feature std, L-inf)")
    axes[0].set_ylabel(metric)
    axes[-1].legend(fontsize="small")
    names = ", ".join(name for _, name in kinds)
    steps = f" ({adv['pgd_steps']} PGD steps)" if "pgd_steps" in adv else ""
    return _figure_html(fig, f"Line plots of {metric} vs attack radius eps for {names}, one line per model",
                        f"{metric} under adversarial attacks{steps}: white-box FGSM and PGD on each model, and PGD "
                        "examples transferred from the source model.")


def _shift_table(shift: dict[str, Any] | None, clean: dict[str, Any]) -> str:
    """The most harmful single-feature shifts: metric after the shift and drop, per model."""
    if not shift or not shift.get("largest_drop"):
        return ""
    features, scores = shift.get("features", []), shift.get("models", {})
    labels = list(scores) or list(clean)
    headers = ["feature", *(h for label in labels for h in (f"{label} metric", f"{label} drop"))]
    rows = []
    for row in shift["largest_drop"]:
        f = features.index(row["feature"]) if row["feature"] in features else None
        cells = [(None if f is None else scores.get(label, [None] * len(features))[f], row["drop"].get(label))
                 for label in labels]
        rows.append([row["feature"], *(v for pair in cells for v in pair)])
    title = f"Most harmful feature shifts (+{_fmt(shift.get('shift_std'))} std, one feature at a time)"
    return f"<h3>{_esc(title)}</h3>\n" + _table(headers, rows)


def _json_details(title: str) -> Callable[[Any], str]:
    def render(value: Any) -> str:
        text = dumps(value, default=str)
        return _section(title, f"<details>\n<summary>{_esc(title)} (JSON)</summary>\n<pre>{_esc(text)}</pre>\n"
                               "</details>\n")
    return render


SECTIONS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("about", _about), ("headline", _headline), ("summary", _summary), ("layers", _layers), ("sensitivity", _sensitivity), ("pareto", _pareto),
    ("robustness", _robustness), ("config", _json_details("Configuration")), ("extra", _json_details("Extra")),
)
