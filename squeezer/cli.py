"""The ``squeezer`` command line: ``demo``, ``quantize``, ``info``.

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

from .errors import SqueezerError
from .search.formats import DEFAULT_FORMATS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make PyTorch models smaller and faster, with evidence.")
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _json_text(data: Any) -> str:
    from .report import _finite

    return json.dumps(_finite(data), indent=2)


@app.command()
def demo(
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write demo.json into this directory."),
    seed: int = typer.Option(0, help="Seed for the data split and training."),
) -> None:
    """Train the bundled credit-scoring model and quantize it with every preset."""
    from .examples.demo import run_demo
    from .io.atomic import _writable_parent, atomic_write_text

    try:
        if out is not None:
            _writable_parent(out)
        result = run_demo(seed=seed, progress=not json_out)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "demo.json", _json_text(result))
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
    model: str = typer.Option(..., "--model", help="Model factory, pkg.module:function returning an nn.Module."),
    out: Path = typer.Option(..., "--out", help="Output directory (checkpoint + report.json)."),
    preset: str = typer.Option("w8", "--preset", help="Preset name or a YAML config file."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Float weights (.safetensors) to load first."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data: .npy, .npz, .safetensors or .csv."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per calibration batch."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Override the preset's weight bits (1..16)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Override with per-group weights of this size."),
    html: bool = typer.Option(False, "--html", help="Also write report.html next to the checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Map every allocation of 1 MiB or more on its "
                                    "own (glibc): lower resident peak while calibrating, slower forwards."),
) -> None:
    """Quantize your own model and write a checkpoint with its report."""
    from dataclasses import replace

    from .api import quantize
    from .calibration import batch_signature
    from .config import resolve_config
    from .html_report import quant_report_data
    from .io.atomic import _writable_parent
    from .io.calib_files import load_calibration
    from .io.checkpoint import save
    from .io.user_model import load_factory, load_weights
    from .memory import limit_heap_retention
    from .quant.spec import PerGroup

    try:
        cfg = resolve_config(preset)
        if bits is not None or group_size is not None:
            weight = replace(cfg.weight, bits=cfg.weight.bits if bits is None else bits,
                             granularity=cfg.weight.granularity if group_size is None else PerGroup(group_size))
            cfg = replace(cfg, weight=weight, name=f"{cfg.name}+overrides")
        _writable_parent(out)
        if low_memory and not limit_heap_retention():
            err_console.print("[yellow]warning:[/] --low-memory: not a glibc system; the allocator is left as it is")
        net = load_factory(model)
        if weights is not None:
            load_weights(net, weights)
        batches = None if calib is None else load_calibration(calib, batch_size)
        q = quantize(net, cfg, calib=batches, inplace=True, progress=not json_out)
        report = q.squeezer_report
        extra = {"report": json.loads(report.to_json()), "model_factory": model}
        if batches:
            extra["example_inputs"] = batch_signature(batches[0])
        save(q, out, extra=extra)
        _write_report(out, quant_report_data(report), html)
    except SqueezerError as exc:
        _fail(exc)
    if json_out:
        print(report.to_json())
    else:
        console.print(report.table())
        console.print(f"checkpoint written to {out}")


@app.command()
def info(directory: Path = typer.Argument(..., help="A checkpoint directory written by squeezer.")) -> None:
    """Describe a checkpoint: versions, layers, formats and sizes."""
    from .io.checkpoint import TENSORS, read_manifest

    try:
        manifest = read_manifest(directory)
    except SqueezerError as exc:
        _fail(exc)
    table = Table(title=f"{directory}: squeezer {manifest['squeezer_version']}, torch {manifest['torch_version']}, "
                        f"format v{manifest['format_version']}")
    for col in ("layer", "type", "shape", "weight format"):
        table.add_column(col)
    from .config import QuantConfig

    for name, layer in manifest["layers"].items():
        cfg = QuantConfig.from_dict(layer["config"])
        rotation = f", input rotated (Hadamard {layer['input_rotation']})" if "input_rotation" in layer else ""
        table.add_row(name, layer["type"], "×".join(map(str, layer["shape"])), cfg.weight.describe() + rotation)
    size = (directory / TENSORS).stat().st_size if (directory / TENSORS).exists() else 0
    table.caption = f"{TENSORS}: {size:,} bytes"
    console.print(table)


@app.command("export")
def export_cmd(
    directory: Path = typer.Argument(..., help="A checkpoint directory written by squeezer."),
    out: Path = typer.Option(..., "--out", help="Output file: model.onnx, model.tflite or model.pte."),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx, tflite or executorch (default: from --out's suffix)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model factory (default: the one recorded by quantize)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Shape of one example input, e.g. 1x61."),
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
    """Export a checkpoint for a runtime (ONNX Runtime / TensorRT, TFLite, ExecuTorch) with squeezer's integers."""
    from dataclasses import asdict

    import torch

    from .calibration import example_from_signature
    from .errors import ConfigError, DataError
    from .io.calib_files import load_calibration
    from .io.checkpoint import load, read_manifest
    from .io.export import export
    from .io.user_model import load_factory

    try:
        manifest = read_manifest(directory)
        factory = model or manifest.get("model_factory")
        if not factory:
            raise ConfigError("the checkpoint records no model factory: pass --model pkg.module:factory")
        if input_shape:
            try:
                dims = [int(d) for d in input_shape.lower().replace(",", "x").split("x")]
            except ValueError:
                raise ConfigError(f"--input-shape must look like 1x61, got {input_shape!r}") from None
            example = torch.zeros(*dims)
        elif "example_inputs" in manifest:
            example = example_from_signature(manifest["example_inputs"])
        else:
            raise ConfigError("the checkpoint records no example input: pass --input-shape, e.g. 1x61")
        net = load(directory, model=load_factory(factory))
        if out.exists() and out.is_dir():
            raise DataError(f"--out {out} is a directory; give a file name such as model.onnx")
        options: dict[str, Any] = {}
        if unsupported != "error":
            options["unsupported"] = unsupported
        if calib is not None:
            options["calib"] = load_calibration(calib, 64)
        if unquantized_outputs is not None:
            options["unquantized_outputs"] = unquantized_outputs
        if weight_only is not None:
            options["weight_only"] = weight_only
        report = export(net, example, out, format=fmt, **options)
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
    recipe: str = typer.Option(..., "--recipe", help="A bundled recipe name or a YAML file."),
    model: str = typer.Option(..., "--model", help="Model factory, pkg.module:function returning an nn.Module."),
    data: Path = typer.Option(..., "--data", help=".npz with arrays x (inputs) and y (targets)."),
    out: Path = typer.Option(..., "--out", help="Output directory: report.json (+ checkpoint when quantized)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Float weights (.safetensors) to load first."),
    evaluate: Optional[str] = typer.Option(None, "--eval", help="pkg.module:function(model) -> float, run after each step."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per batch."),
    html: bool = typer.Option(False, "--html", help="Also write report.html into --out."),
    robust_metric: Optional[str] = typer.Option(None, "--robust-metric",
                                                help="accuracy or roc_auc: add the robustness section on --data."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run a compression recipe (prune, lowrank, quantize, qat, distill, finetune) on your model."""
    import copy

    from .errors import DataError
    from .io.atomic import _writable_parent, atomic_directory
    from .report_data import task_metric
    from .io.calib_files import load_calibration
    from .io.checkpoint import save
    from .io.user_model import load_attribute, load_factory, load_weights
    from .modules import quant_layers
    from .recipe import compress
    from .report_data import add_robustness, compression_data

    try:
        if robust_metric is not None:
            task_metric(robust_metric)
        _writable_parent(out)
        net = load_factory(model)
        if weights is not None:
            load_weights(net, weights)
        arrays = load_calibration(data, batch_size)
        if not isinstance(arrays[0], dict) or set(arrays[0]) != {"x", "y"}:
            raise DataError(f"--data {data} must be an .npz with exactly the arrays 'x' and 'y'")
        batches = [(b["x"], b["y"]) for b in arrays]
        metric = None if evaluate is None else load_attribute(evaluate, "--eval")
        original = copy.deepcopy(net).eval() if robust_metric else None
        result = compress(net, recipe, data=batches, evaluate=metric)
        report = result.squeezer_compression.to_dict()
        data = compression_data(report, f"squeezer compress: {recipe}")
        if original is not None:
            add_robustness(data, {"fp32": original, "compressed": result.eval()}, batches, robust_metric)
        with atomic_directory(out) as tmp:
            (tmp / "report.json").write_text(_json_text(report))
            if quant_layers(result):
                save(result, tmp / "checkpoint", extra={"model_factory": model})
            _write_report(tmp, data, html)
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
    model: str = typer.Option(..., "--model", help="Model factory, pkg.module:function returning an nn.Module."),
    evaluate: str = typer.Option(..., "--eval", help="pkg.module:function(model) -> float, the metric to keep."),
    calib: Path = typer.Option(..., "--calib", help="Calibration data: .npy, .npz, .safetensors or .csv."),
    out: Path = typer.Option(..., "--out", help="Output directory: checkpoint/, search.json, report_data.json."),
    max_drop: float = typer.Option(..., "--max-drop", help="Tolerated metric drop, in the units --eval returns."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Float weights (.safetensors) to load first."),
    budget_bits: Optional[float] = typer.Option(None, "--budget-bits", help="Mean code bits per weight to start from."),
    budget_bytes: Optional[float] = typer.Option(None, "--budget-bytes", help="Model bytes to start from."),
    trials: int = typer.Option(30, "--trials", help="Most models to evaluate."),
    strategy: str = typer.Option("tune", "--strategy", help="tune (fallback from the budget) or pareto (Optuna study)."),
    formats: str = typer.Option(",".join(DEFAULT_FORMATS), "--formats", help="Candidate formats, comma-separated."),
    algorithm: str = typer.Option("rtn", "--algorithm", help="PTQ algorithm for every layer (rtn, gptq, awq, ...)."),
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
    robust_metric: str = typer.Option("accuracy", "--robust-metric", help="accuracy or roc_auc (with --robust-data)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Find the smallest mixed-precision model whose metric stays within --max-drop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .calibration import batch_signature
    from .errors import ConfigError
    from .io.atomic import _writable_parent
    from .io.calib_files import load_calibration
    from .io.user_model import load_attribute, load_factory, load_weights
    from .report_data import add_robustness, task_metric
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
                             extra={"model_factory": model, "example_inputs": batch_signature(batches[0])})
        if robust_data is not None:
            pairs = load_calibration(robust_data, batch_size)
            if not isinstance(pairs[0], dict) or set(pairs[0]) != {"x", "y"}:
                raise ConfigError(f"--robust-data {robust_data} must be an .npz with exactly the arrays 'x' and 'y'")
            add_robustness(run.data, {"fp32": net, "compressed": run.model}, [(b["x"], b["y"]) for b in pairs],
                           robust_metric)
        _write_report(out, run.data, html)
    except SqueezerError as exc:
        _fail(exc)
    if json_out:
        print(_json_text(run.data))
        return
    _print_search(run.data, out)


def _numbers(text: str, flag: str) -> tuple[Any, ...]:
    """``"0,0.25"`` -> ``(0.0, 0.25)``; ``none`` -> ``None``."""
    from .errors import ConfigError

    try:
        return tuple(None if v.strip().lower() == "none" else float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers (or none), got {text!r}") from None


def _write_report(directory: Path, data: dict[str, Any], html: bool) -> None:
    """``report_data.json`` (what ``squeezer report`` renders) and, with ``html``, ``report.html``."""
    from .html_report import write_html
    from .io.atomic import atomic_write_text

    atomic_write_text(directory / "report_data.json", _json_text(data))
    if html:
        write_html(data, directory / "report.html")


def _print_search(data: dict[str, Any], out: Path) -> None:
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
    from .errors import DataError
    from .html_report import write_html

    source = directory / "report_data.json"
    try:
        if not source.is_file():
            raise DataError(f"{directory} holds no report_data.json: run quantize, compress or search with --out first")
        try:
            data = json.loads(source.read_text())
        except ValueError as exc:
            raise DataError(f"{source} is not valid JSON: {exc}") from None
        target = write_html(data, out or directory / "report.html")
    except SqueezerError as exc:
        _fail(exc)
    console.print(f"report written to {target}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
