"""The command line's surface: ``--version``, a light import, and help texts that list every choice."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import squeezer
from squeezer import cli
from squeezer.cli import app

runner = CliRunner()


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"squeezer {squeezer.__version__}"


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import squeezer.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_listed_choices_match_the_library() -> None:
    from squeezer.algorithms.base import ALGORITHMS
    from squeezer.recipe import bundled_recipes
    from squeezer.task_metrics import METRICS
    from squeezer.search.formats import DEFAULT_FORMATS
    from squeezer.search.session import STRATEGIES

    assert cli.PRESETS == tuple(squeezer.PRESETS)
    assert cli.ALGORITHMS == tuple(sorted(ALGORITHMS))
    assert cli.SEARCH_FORMATS == DEFAULT_FORMATS
    assert cli.STRATEGIES == STRATEGIES
    assert cli.RECIPES == tuple(bundled_recipes())
    assert cli.METRICS == tuple(METRICS)


@pytest.mark.parametrize("command, names", [
    ("quantize", [*cli.PRESETS, *cli.ALGORITHMS]),
    ("search", [*cli.SEARCH_FORMATS, *cli.ALGORITHMS, *cli.STRATEGIES, *cli.METRICS]),
    ("compress", [*cli.RECIPES, *cli.METRICS]),
])
def test_help_lists_the_choices(command: str, names: list[str]) -> None:
    text = _help(command)
    missing = [name for name in names if name not in text]
    assert not missing, missing
    assert "imports and runs that Python code" in text


def test_lazy_public_names_resolve() -> None:
    """Every public name imports on first use (``squeezer.export`` is the function, its formats live in
    ``squeezer.exporters``); submodules are reachable as attributes."""
    code = ("import squeezer, squeezer.exporters.onnx.graph as graph; "
            "assert callable(squeezer.export), squeezer.export; "
            "missing = [n for n in squeezer.__all__ if getattr(squeezer, n, None) is None]; "
            "assert not missing, missing; "
            "assert squeezer.modules.QuantLinear and 'quantize' in dir(squeezer)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
