"""The ``squeezer`` command line: ``demo``, ``quantize``, ``info``, ``export``, ``compress``, ``search``,
``report``, ``pretrained``, ``lm-eval``. It parses flags and prints; the work is the library's.

Importing this module stays light (typer, rich): torch and squeezer's modules that need it are
imported inside the command that uses them, so ``squeezer --help`` answers at once. The choices the
help texts list are spelled out below; a test checks them against the library's registries.

Bad input ends with a one-line ``error: ...`` naming the culprit and exit code 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, DataError, SqueezerError
from .version import __version__

PRESETS = ("w8", "w8g128", "w4g128", "w8a8", "w8a8-asym", "w8a8-tensor", "w8a8-static", "w3g128", "w2g64",
           "ternary", "binary", "log2-w4", "kmeans-w4", "q8_0", "q4_0")
"""``squeezer.PRESETS``, in order."""
ALGORITHMS = ("adaround", "awq", "bias_correction", "clip", "gptq", "hadamard", "hqq", "rtn", "smoothquant")
"""The registered weight algorithms (``squeezer.algorithms.base.ALGORITHMS``), sorted."""
SEARCH_FORMATS = ("w8", "w4g128", "w3g128", "w2g64", "fp32")
"""``squeezer.search.formats.DEFAULT_FORMATS``."""
STRATEGIES = ("tune", "pareto")
"""``squeezer.search.session.STRATEGIES``."""
RECIPES = ("lowrank-int8-distill", "prune50-int8-finetune", "qat-w2", "sparse80-int8")
"""``squeezer.recipe.bundled_recipes()``."""
METRICS = ("accuracy", "roc_auc")
"""``squeezer.task_metrics.METRICS``."""
HF_PRESETS = ("w8", "w8g128", "w4g128", "w3g128", "w2g64", "q8_0", "q4_0")
"""``squeezer.hf.pretrained.data_free_presets()``: the presets of ``squeezer pretrained``."""
HF_FORMATS = ("compressed-tensors", "gguf", "squeezer")
"""``squeezer.hf.FORMATS``."""

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make PyTorch models smaller and faster, with evidence.")
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"squeezer {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


_FLAGS = {"calib": "--calib", "data": "--data"}
"""API keyword arguments a message may ask for (``calib=...``) and the flag that gives them here."""


def _fail(exc: SqueezerError) -> None:
    """One line ``error: <message>`` (the API's ``name=...`` said as its flag; no rich markup read in it), exit 2."""
    from rich.markup import escape

    text = str(exc)
    if exc.argument in _FLAGS:
        text = text.replace(f"{exc.argument}=...", _FLAGS[exc.argument])
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _json_text(data: Any) -> str:
    from .report.json import dumps

    return dumps(data)


@app.command()
def demo(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write demo.json into this directory."),
    seed: int = typer.Option(0, help="Seed for the data split and training."),
) -> None:
    """Train the bundled credit-scoring model and quantize it with every preset."""
    with _status("squeezer demo: loading torch", json_out) as status:
        from .examples.demo import run_demo
        from .io.atomic import _writable_parent, atomic_write

        def step(message: str, row: dict[str, Any] | None) -> None:
            if status is None:
                return
            if row is None:
                status.update(f"squeezer demo: {message}")
            else:
                err_console.print(f"{message}: accuracy {row['accuracy']:.3f} ({row['accuracy_delta_pt']:+.1f} pt), "
                                  f"weights ×{row['compression']:.2f} smaller", highlight=False)

        try:
            if out is not None:
                _writable_parent(out)
            result = run_demo(seed=seed, on_step=step)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                atomic_write(out / "demo.json", _json_text(result))
        except SqueezerError as exc:
            _fail(exc)
    if json_out:
        print(_json_text(result))
        return
    ds = result["dataset"]
    table = Table(title=f"squeezer demo: credit-risk MLP ({result['model']['params']:,} params) on {ds['name']}, "
                        f"{ds['test_rows']} test rows")
    for col in ("preset", "format", "bits/w", "weight bytes", "smaller", "accuracy", "Δ acc pt",
                "ROC-AUC", "Δ AUC", "SQNR dB"):
        table.add_column(col, justify="left" if col in ("preset", "format") else "right")
    for r in result["rows"]:
        table.add_row(r["preset"], r["format"], _fmt(r["bits_per_weight"], 2), f"{r['weight_bytes']:,}",
                      f"×{r['compression']:.2f}", _fmt(r["accuracy"]), _fmt(r["accuracy_delta_pt"], 1),
                      _fmt(r["roc_auc"], 4), _fmt(r["roc_auc_delta"], 4), _fmt(r["weight_sqnr_db"], 1))
    console.print(table)


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Option(..., "--model", help="Model factory, pkg.module:function returning an nn.Module "
                              "(imports and runs that Python code)."),
    out: Path = typer.Option(..., "--out", help="Output directory (checkpoint + report.json)."),
    preset: str = typer.Option("w8", "--preset", help=f"Preset: {', '.join(PRESETS)}; with an algorithm suffix "
                               f"(w4g128-gptq: {', '.join(ALGORITHMS)}, or several joined by '+'); or a YAML config file."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Float weights (.safetensors) to load first."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data: .npy, .npz, .safetensors or .csv."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per calibration batch."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Override the preset's weight bits (1..16)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Override with per-group weights of this size."),
    evaluate: Optional[str] = typer.Option(None, "--eval", help="Task metric pkg.module:function(model) -> float or "
                                           "dict of floats: imports and runs that Python code on the float model and "
                                           "on the quantized one; the report shows both."),
    html: bool = typer.Option(False, "--html", help="Also write report.html next to the checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Map every allocation of 1 MiB or more on its "
                                    "own (glibc): lower resident peak while calibrating, slower forwards."),
) -> None:
    """Quantize your own model and write a checkpoint with its report."""
    with _status("squeezer quantize: loading torch", json_out):
        from dataclasses import replace

        from .api import quantize
        from .calibration import batch_signature, check_fits, model_inputs
        from .resolve import resolve_config
        from .io.atomic import _writable_parent
        from .io.calib_files import load_calibration
        from .io.checkpoint import save
        from .io.user_model import evaluate_user, load_attribute, load_factory, load_weights
        from .memory import limit_heap_retention
        from .quant.spec import PerGroup
        from .report.data import quant_report_data
        from .report.quant import QuantReport
        from .transform import report_of

    try:
        cfg = resolve_config(preset)
        if bits is not None or group_size is not None:
            weight = replace(cfg.weight, bits=cfg.weight.bits if bits is None else bits,
                             granularity=cfg.weight.granularity if group_size is None else PerGroup(group_size))
            cfg = replace(cfg, weight=weight, name=f"{cfg.name}+overrides")
        _writable_parent(out)
        if low_memory and not limit_heap_retention():
            err_console.print("[yellow]warning:[/] --low-memory: not a glibc system; the allocator is left as it is")
        metric = None if evaluate is None else load_attribute(evaluate, "--eval")
        net = load_factory(model)
        if weights is not None:
            load_weights(net, weights)
        batches = None if calib is None else load_calibration(calib, batch_size)
        if batches is not None:
            check_fits(net, batches[0], f"--calib {calib}")
        before = None if metric is None else evaluate_user(metric, net, evaluate)
        q = quantize(net, cfg, calib=batches, inplace=True, progress=not json_out)
        report = report_of(q, QuantReport)
        task = None if metric is None else _before_after(before, evaluate_user(metric, q, evaluate))
        extra = {"report": report.to_dict(), "model_factory": model, **({"task": task} if task else {})}
        if batches:
            extra["example_inputs"] = batch_signature(model_inputs(net, batches[0]))
        save(q, out, extra=extra)
        data = quant_report_data(report, task)
        _write_report(out, data, html)
    except SqueezerError as exc:
        _fail(exc)
    if json_out:
        print(_json_text({**report.to_dict(), **({"task": task} if task else {})}))
        return
    _print_about(data)
    console.print(report.table())
    float_warning = report.float_warning()
    if float_warning:
        console.print(f"[yellow]warning:[/] {float_warning}", highlight=False)
    if task:
        console.print("task metric: " + "; ".join(f"{name} {v['before']:.4g} -> {v['after']:.4g}"
                                                  for name, v in task.items()), highlight=False)
    console.print(f"checkpoint written to {out}")


def _status(message: str, quiet: bool) -> Any:
    """A spinner on stderr while ``message`` is under way (a no-op context when ``quiet``)."""
    from contextlib import nullcontext

    return nullcontext() if quiet else err_console.status(message)


def _before_after(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{name: {"before", "after"}}`` for the metric names both runs returned."""
    return {name: {"before": before[name], "after": after[name]} for name in before if name in after}


def _print_about(data: dict[str, Any]) -> None:
    """One line: model, preset or strategy, date, versions."""
    console.print(" · ".join(f"{key} {value}" for key, value in data["about"].items()), highlight=False)


@app.command()
def info(directory: Path = typer.Argument(..., help="A checkpoint directory written by squeezer.")) -> None:
    """Verify a checkpoint (digest, every tensor) and describe it: versions, layers, formats and sizes."""
    from .io.checkpoint import TENSORS, verify

    try:
        manifest = verify(directory)
    except SqueezerError as exc:
        _fail(exc)
    table = Table(title=f"{directory}: squeezer {manifest['squeezer_version']}, torch {manifest['torch_version']}, "
                        f"format v{manifest['format_version']}")
    for col in ("layer", "type", "shape", "weight format"):
        table.add_column(col)
    from .quant.scheme import LayerScheme

    for name, layer in manifest["layers"].items():
        cfg = LayerScheme.from_dict(layer["scheme"])
        rotation = f", input rotated (Hadamard {layer['input_rotation']})" if "input_rotation" in layer else ""
        table.add_row(name, layer["type"], "×".join(map(str, layer["shape"])), cfg.weight.describe() + rotation)
    size = (directory / TENSORS).stat().st_size if (directory / TENSORS).exists() else 0
    table.caption = f"{TENSORS}: {size:,} bytes"
    console.print(table)


class _ExportCommand(typer.core.TyperCommand):
    """``squeezer export``, whose help lists the registered export formats and their options when shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from rich.markup import escape

        from .exporters import describe_options, formats, get

        lines = [(export_cmd.__doc__ or "").strip(), "Formats (--format, or from --out's suffix) and their options "
                 "(--option key=value):"]
        for name in formats():
            exporter = get(name)
            lines.append(f"{name} ({', '.join(exporter.suffixes)}): {exporter.summary}. Options: "
                         + "; ".join(describe_options(exporter.options)))
        self.help = escape("\n\n".join(lines))
        super().format_help(ctx, formatter)


def _option_texts(pairs: list[str], flags: dict[str, str | None]) -> dict[str, str]:
    """``--option key=value`` pairs and the named flags that are set, as ``{key: value}``."""
    from .errors import ConfigError

    texts = {key: value for key, value in flags.items() if value is not None}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option takes key=value, got {pair!r}")
        if key in texts:
            raise ConfigError(f"option {key!r} is given twice")
        texts[key] = value
    return texts


@app.command("export", cls=_ExportCommand)
def export_cmd(
    directory: Path = typer.Argument(..., help="A checkpoint directory written by squeezer."),
    out: Path = typer.Option(..., "--out", help="Output file, e.g. model.onnx, model.tflite or model.pte."),
    fmt: Optional[str] = typer.Option(None, "--format", help="An export format listed above (default: from --out's suffix)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model factory, pkg.module:function returning the float "
                                        "nn.Module (required: imports and runs that Python code; a checkpoint never "
                                        "names code to run)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Shape of one example input, e.g. 1x61."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="A format option key=value (repeatable; listed above)."),
    calib: Optional[Path] = typer.Option(None, "--calib",
                                         help="TFLite full-integer models: data for the output grids of layers squeezer leaves unquantized."),
    unsupported: str = typer.Option("error", "--unsupported", help="A layer with no int8 form: error, or float."),
    unquantized_outputs: Optional[str] = typer.Option(
        None, "--unquantized-outputs",
        help="TFLite full-integer models, a layer whose output squeezer leaves in float: int8 (default) or float."),
    weight_only: Optional[str] = typer.Option(
        None, "--weight-only",
        help="ExecuTorch, weight-only Linear layers: dynamic (XNNPACK int8, also quantizes input rows; default) or exact."),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as JSON."),
) -> None:
    """Export a checkpoint for a runtime (ONNX Runtime / TensorRT, TFLite, ExecuTorch, ...) with squeezer's integers."""
    from dataclasses import asdict

    from .errors import ConfigError
    from .exporters import export_checkpoint, exporter_for, options_from_text
    from .io.calib_files import load_calibration

    try:
        shape = None
        if input_shape:
            try:
                shape = tuple(int(d) for d in input_shape.lower().replace(",", "x").split("x"))
            except ValueError:
                raise ConfigError(f"--input-shape must look like 1x61, got {input_shape!r}") from None
        exporter = exporter_for(out, fmt)
        texts = _option_texts(option or [], {"unsupported": None if unsupported == "error" else unsupported,
                                             "unquantized_outputs": unquantized_outputs, "weight_only": weight_only})
        options = options_from_text(exporter.name, exporter.options, texts)
        if calib is not None:
            options["calib"] = load_calibration(calib, 64)
        report = export_checkpoint(directory, out, exporter.name, model=model, input_shape=shape,
                                   calib_source=f"--calib {calib}", **options)
    except SqueezerError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(asdict(report), indent=2))
        return
    table = Table(title=f"{fmt or out.suffix.lstrip('.')} export: {out}")
    table.add_column("layer")
    table.add_column("exported as")
    for name, kind in report.layers.items():
        table.add_row(name, kind)
    console.print(table)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")


@app.command("compress")
def compress_cmd(
    recipe: str = typer.Option(..., "--recipe", help=f"A bundled recipe ({', '.join(RECIPES)}) or a YAML file."),
    model: str = typer.Option(..., "--model", help="Model factory, pkg.module:function returning an nn.Module "
                              "(imports and runs that Python code)."),
    data: Path = typer.Option(..., "--data", help=".npz with arrays x (inputs) and y (targets)."),
    out: Path = typer.Option(..., "--out", help="Output directory: report.json (+ checkpoint when quantized)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Float weights (.safetensors) to load first."),
    evaluate: Optional[str] = typer.Option(None, "--eval", help="pkg.module:function(model) -> float, run after each "
                                           "step (imports and runs that Python code)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per batch."),
    html: bool = typer.Option(False, "--html", help="Also write report.html into --out."),
    robust_metric: Optional[str] = typer.Option(None, "--robust-metric", help=f"{' or '.join(METRICS)}: add the "
                                                "robustness section on --data."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run a compression recipe (prune, lowrank, quantize, qat, distill, finetune) on your model."""
    with _status("squeezer compress: loading torch", json_out):
        import copy

        from .io.atomic import _writable_parent, atomic_directory
        from .io.calib_files import load_pairs
        from .io.checkpoint import save
        from .io.user_model import load_attribute, load_factory, load_weights
        from .modules import quant_layers
        from .recipe import CompressionReport, compress
        from .report.data import add_robustness, compression_data
        from .task_metrics import task_metric
        from .transform import report_of

    try:
        if robust_metric is not None:
            task_metric(robust_metric)
        _writable_parent(out)
        net = load_factory(model)
        if weights is not None:
            load_weights(net, weights)
        batches = load_pairs(data, batch_size, "--data")
        metric = None if evaluate is None else load_attribute(evaluate, "--eval")
        original = copy.deepcopy(net).eval() if robust_metric else None
        result = compress(net, recipe, data=batches, evaluate=metric)
        report = report_of(result, CompressionReport).to_dict()
        page = compression_data(report, f"squeezer compress: {recipe}")
        if original is not None:
            add_robustness(page, {"fp32": original, "compressed": result.eval()}, batches, robust_metric)
        with atomic_directory(out) as tmp:
            (tmp / "report.json").write_text(_json_text(report))
            if quant_layers(result):
                save(result, tmp / "checkpoint", extra={"model_factory": model})
            _write_report(tmp, page, html)
    except SqueezerError as exc:
        _fail(exc)
    if json_out:
        print(_json_text(report))
        return
    table = Table(title=f"squeezer compress: {recipe}")
    for col in ("step", "params", "non-zero", "bytes", "metric", "seconds"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for row in report["rows"]:
        table.add_row(row["step"], f"{row['params']:,}", f"{row['nonzero_params']:,}", f"{row['bytes']:,}",
                      _fmt(row["metric"], 4), f"{row['seconds']:.1f}")
    console.print(table)


@app.command("search")
def search_cmd(
    model: str = typer.Option(..., "--model", help="Model factory, pkg.module:function returning an nn.Module "
                              "(imports and runs that Python code)."),
    evaluate: str = typer.Option(..., "--eval", help="pkg.module:function(model) -> float, the metric to keep "
                                 "(imports and runs that Python code)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration data: .npy, .npz, .safetensors or .csv."),
    out: Path = typer.Option(..., "--out", help="Output directory: checkpoint/, search.json, report_data.json."),
    max_drop: float = typer.Option(..., "--max-drop", help="Tolerated metric drop, in the units --eval returns."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Float weights (.safetensors) to load first."),
    budget_bits: Optional[float] = typer.Option(None, "--budget-bits", help="Mean code bits per weight to start from."),
    budget_bytes: Optional[float] = typer.Option(None, "--budget-bytes", help="Model bytes to start from."),
    trials: int = typer.Option(30, "--trials", help="Most models to evaluate."),
    strategy: str = typer.Option("tune", "--strategy", help=f"{' or '.join(STRATEGIES)}: tune falls back from the "
                                 "budget, pareto runs an Optuna study."),
    formats: str = typer.Option(",".join(SEARCH_FORMATS), "--formats", help="Candidate formats, comma-separated: "
                                f"fp32 (keep float) or presets without an algorithm ({', '.join(PRESETS)})."),
    algorithm: str = typer.Option("rtn", "--algorithm", help=f"PTQ algorithm for every layer: {', '.join(ALGORITHMS)}, "
                                  "or several joined by '+'."),
    relative: bool = typer.Option(False, "--relative", help="--max-drop is a fraction of the float metric."),
    lower_is_better: bool = typer.Option(False, "--lower-is-better", help="The metric is a loss / error."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study in --out (strategy pareto)."),
    sparsity: str = typer.Option("0", "--sparsity", help="Pareto: channel-pruning fractions to try, e.g. 0,0.25,0.5."),
    rank: str = typer.Option("none", "--rank", help="Pareto: SVD parameter fractions to try, e.g. none,0.5."),
    seed: int = typer.Option(0, "--seed", help="Seed of the study's sampler."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per calibration batch."),
    html: bool = typer.Option(False, "--html", help="Also write report.html into --out."),
    robust_data: Optional[Path] = typer.Option(None, "--robust-data",
                                               help=".npz with arrays x and y: add the robustness section."),
    robust_metric: str = typer.Option("accuracy", "--robust-metric", help=f"{' or '.join(METRICS)} "
                                      "(with --robust-data)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Find the smallest mixed-precision model whose metric stays within --max-drop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with _status("squeezer search: loading torch", json_out):
        from .calibration import batch_signature, check_fits, model_inputs
        from .io.atomic import _writable_parent
        from .io.calib_files import load_calibration, load_pairs
        from .io.user_model import load_attribute, load_factory, load_weights
        from .report.data import add_robustness, search_data
        from .task_metrics import task_metric
        from .search.session import run_search

    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        task_metric(robust_metric)
        _writable_parent(out)
        budget = {k: v for k, v in (("bits", budget_bits), ("bytes", budget_bytes)) if v is not None} or None
        names = tuple(f.strip() for f in formats.split(",") if f.strip())
        sparsities = _numbers(sparsity, "--sparsity")
        ranks = _numbers(rank, "--rank")
        if trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {trials}")
        net = load_factory(model).eval()
        if weights is not None:
            load_weights(net, weights)
        batches = load_calibration(calib, batch_size)
        check_fits(net, batches[0], f"--calib {calib}")
        metric = load_attribute(evaluate, "--eval")
        columns = (TextColumn("searching"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[last]}"))
        # the pareto study reports its trials itself
        with Progress(*columns, console=err_console, transient=True, disable=json_out or strategy == "pareto") as bar:
            task = bar.add_task("trials", total=trials, last="")

            def show(trial: Any) -> None:
                bar.update(task, advance=1, last=f"last: {getattr(trial, 'bytes', '')} B, "
                                                 f"metric {_fmt(getattr(trial, 'metric', None), 4)}")
            run = run_search(net, batches, metric, out, max_drop=max_drop, budget=budget, strategy=strategy,
                             trials=trials, formats=names, algorithm=algorithm, relative=relative,
                             higher_is_better=not lower_is_better, resume=resume, seed=seed, sparsity=sparsities,
                             rank=ranks, progress=not json_out,
                             on_trial=show,
                             extra={"model_factory": model, "example_inputs": batch_signature(model_inputs(net, batches[0]))})
        data = search_data(run)
        if robust_data is not None:
            add_robustness(data, {"fp32": net, "compressed": run.model}, load_pairs(robust_data, batch_size,
                                                                                    "--robust-data"), robust_metric)
        _write_report(out, data, html)
    except SqueezerError as exc:
        _fail(exc)
    if json_out:
        print(_json_text(data))
        return
    _print_search(data, out)


def _numbers(text: str, flag: str) -> tuple[Any, ...]:
    """``"0,0.25"`` -> ``(0.0, 0.25)``; ``none`` -> ``None``."""
    try:
        return tuple(None if v.strip().lower() == "none" else float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers (or none), got {text!r}") from None


def _write_report(directory: Path, data: dict[str, Any], html: bool) -> None:
    """``report_data.json`` (what ``squeezer report`` renders) and, with ``html``, ``report.html``."""
    from .io.atomic import atomic_write
    from .report.html import write_html

    atomic_write(directory / "report_data.json", _json_text(data))
    if html:
        write_html(data, directory / "report.html")


def _print_search(data: dict[str, Any], out: Path) -> None:
    _print_about(data)
    table = Table(title="squeezer search: chosen model")
    for col in ("", "bytes", "batch-1 ms", "metric"):
        table.add_column(col, justify="left" if not col else "right")
    for key in ("before", "after"):
        row = data["summary"][key]
        table.add_row(key, f"{row['bytes']:,}", _fmt(row["latency_ms"], 3), _fmt(row["metric"], 4))
    config = data["config"]
    counts: dict[str, int] = {}
    for fmt in config["choice"].values():
        counts[fmt] = counts.get(fmt, 0) + 1
    table.caption = (f"{'met' if config['met'] else 'NOT met'} max drop {config['max_drop']:g} after "
                     f"{config['trials']} trials; formats: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    console.print(table)
    console.print(f"checkpoint written to {out / 'checkpoint'}")


@app.command("report")
def report_cmd(
    directory: Path = typer.Argument(..., help="An output directory of quantize, compress or search."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default: DIRECTORY/report.html)."),
) -> None:
    """Write the self-contained HTML report of a quantize, compress or search run."""
    from .report.html import write_html
    from .report.json import loads

    source = directory / "report_data.json"
    try:
        if not source.is_file():
            raise DataError(f"{directory} holds no report_data.json: run quantize, compress or search with --out first")
        try:
            data = loads(source.read_text())
        except ValueError as exc:
            raise DataError(f"{source} is not valid JSON: {exc}") from None
        target = write_html(data, out or directory / "report.html")
    except SqueezerError as exc:
        _fail(exc)
    console.print(f"report written to {target}")


@app.command("pretrained")
def pretrained_cmd(
    hf: Path = typer.Option(..., "--hf", help="A Hugging Face model folder (config.json + safetensors shards)."),
    out: Path = typer.Option(..., "--out", help="Output: a folder (compressed-tensors) or a .gguf file (gguf)."),
    preset: str = typer.Option("w8", "--preset", help=f"Data-free preset: {', '.join(HF_PRESETS)}; with "
                               "--calib-text any preset, algorithm suffixes included (e.g. w4g128-gptq)."),
    format: str = typer.Option("compressed-tensors", "--format", help=f"Output format: {', '.join(HF_FORMATS)} "
                               "(gguf: q8_0 and q4_0 only; squeezer: with --calib-text)."),
    calib_text: Optional[Path] = typer.Option(None, "--calib-text", help="A UTF-8 text file tokenised by the "
                                              "folder's tokenizer: calibrated quantization, one block at a time."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sample (with --calib-text)."),
    n_samples: int = typer.Option(128, "--n-samples", help="Calibration samples at most (with --calib-text)."),
) -> None:
    """Quantize a Hugging Face folder: shard by shard with no data, or block by block on --calib-text."""
    with _status("squeezer pretrained: loading torch", False):
        from .hf import quantize_pretrained

    try:
        calib = None
        if calib_text is not None:
            try:
                calib = [calib_text.read_text(encoding="utf-8")]
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"--calib-text {calib_text}: cannot read it as UTF-8 text ({exc})") from None
        result = quantize_pretrained(hf, preset, out, format=format, calib=calib, seq_len=seq_len,
                                     n_samples=n_samples)
    except SqueezerError as exc:
        _fail(exc)
    console.print(f"{len(result.quantized)} weights quantized ({preset}), {len(result.kept)} tensors kept; "
                  f"{format} written to {out}", highlight=False)
    if result.rtn_fallback:
        console.print(f"experts with too few calibration tokens, kept round-to-nearest: "
                      f"{', '.join(result.rtn_fallback)}", highlight=False)
    if result.float_routers:
        console.print(f"mixture-of-experts routers kept in float: {', '.join(result.float_routers)}", highlight=False)


@app.command("lm-eval")
def lm_eval_cmd(
    hf: Path = typer.Option(..., "--hf", help="A transformers causal-LM folder: the original or a quantized "
                            "compressed-tensors output of `squeezer pretrained`."),
    text: Path = typer.Option(..., "--text", help="A UTF-8 text file, tokenised by the folder's tokenizer."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Window start every N tokens (default seq-len - 1)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Score the first N tokens of the text."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Also print the greedy continuation of this prompt."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Tokens to generate after --prompt."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file."),
) -> None:
    """Perplexity of a causal language model on a text (and a greedy continuation of a prompt)."""
    with _status("squeezer lm-eval: loading torch", False):
        from .hf.lm_eval import evaluate_folder

    try:
        result = evaluate_folder(hf, text, seq_len, stride, max_tokens, prompt, new_tokens)
    except SqueezerError as exc:
        _fail(exc)
    console.print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
                  f"({result['perplexity_seconds']:.1f} s)", highlight=False)
    if prompt is not None:
        from rich.markup import escape

        console.print(f"{escape(prompt)}[bold]{escape(result['generation'])}[/bold]", highlight=False)
    if json_out is not None:
        json_out.write_text(_json_text(result))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
