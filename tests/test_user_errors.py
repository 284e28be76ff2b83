"""Every user mistake is one squeezer error: through the API its type and message, through the command line
exit code 2, a last line ``error: ...`` and no traceback."""

from __future__ import annotations

import time
from collections import UserDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import squeezer
from squeezer.cli import app
from squeezer.config import QuantConfig
from squeezer.errors import ConfigError, DataError, ModelError, excerpt
from squeezer.exporters.onnx.runner import OnnxModule
from squeezer.io.calib_files import load_calibration
from squeezer.recipe import Recipe, load_recipe

from .conftest import MLP

FACTORY = "tests.conftest:MLP"
runner = CliRunner()

# 9 levels of 9 aliases: 9^9 leaves in ~340 bytes
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefghi", "bcdefghij"))


def cli_error(*args: str) -> str:
    """Run the command line; assert the one-line error form; return the error line."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("error:"), result.output
    return result.output


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file(MLP().state_dict(), str(path))
    return path


# calibration data that does not fit the model

@pytest.mark.parametrize("array", [np.ones((8, 5), np.float32), np.ones((8, 40), np.complex64)])
def test_calibration_of_the_wrong_width_or_dtype(tmp_path, array):
    path = tmp_path / "calib.npy"
    np.save(path, array)
    out = cli_error("quantize", "--model", FACTORY, "--calib", str(path), "--out", str(tmp_path / "o"))
    assert str(path) in out
    assert not (tmp_path / "o").exists()


def test_calibration_of_the_wrong_width_names_the_first_layer(tmp_path):
    np.save(tmp_path / "calib.npy", np.ones((8, 5), np.float32))
    out = cli_error("quantize", "--model", FACTORY, "--calib", str(tmp_path / "calib.npy"), "--out", str(tmp_path / "o"))
    assert "[8, 5]" in out and "'fc1'" in out and "40 input features" in out
    with pytest.raises(DataError, match=r"calib batch 0: inputs input \[8, 5\] float32 do not fit.*'fc1'.*40 input"):
        squeezer.quantize(MLP(), "w8", calib=[torch.ones(8, 5)])


def test_integer_calibration_into_a_float_layer():
    with pytest.raises(DataError, match="int64"):
        squeezer.quantize(MLP(), "w8", calib=[torch.ones(8, 40, dtype=torch.int64)])


def test_export_input_shape_of_the_wrong_width(tmp_path, weights):
    out = tmp_path / "ckpt"
    result = runner.invoke(app, ["quantize", "--model", FACTORY, "--weights", str(weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = cli_error("export", str(out), "--model", FACTORY, "--input-shape", "1x7", "--out", str(tmp_path / "m.onnx"))
    assert "input shape 1x7" in text and "40 input features" in text
    assert not (tmp_path / "m.onnx").exists()
    np.save(tmp_path / "calib.npy", np.ones((8, 5), np.float32))
    text = cli_error("export", str(out), "--model", FACTORY, "--input-shape", "1x40", "--calib", str(tmp_path / "calib.npy"),
                     "--out", str(tmp_path / "m.tflite"))
    assert f"--calib {tmp_path / 'calib.npy'}" in text and "[8, 5]" in text


def test_export_example_of_the_wrong_width(tmp_path):
    model = MLP().train()
    with pytest.raises(ModelError, match=r"example_inputs: inputs input \[1, 7\] float32 do not fit.*40 input"):
        squeezer.export(squeezer.quantize(model, "w8"), torch.randn(1, 7), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# batches as DataLoaders and tokenizers give them

def test_labelled_pairs_from_a_data_loader():
    """``(x, y)`` batches: ``forward(x)`` takes one positional input, so ``y`` is a target, left out."""
    data = TensorDataset(torch.randn(32, 40), torch.randint(0, 5, (32,)))
    q = squeezer.quantize(MLP(), "w8a8-static", calib=DataLoader(data, batch_size=8))
    assert squeezer.report_of(q).calibration_batches == 4
    assert q(torch.randn(2, 40)).shape == (2, 5)


def test_labelled_pairs_from_a_file(tmp_path):
    """An .npz of two positional arrays is a tuple batch: (x, y) for a forward(x)."""
    np.savez(tmp_path / "pairs.npz", np.ones((8, 40), np.float32), np.zeros(8, np.int64))
    result = runner.invoke(app, ["quantize", "--model", FACTORY, "--calib", str(tmp_path / "pairs.npz"),
                                 "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * scale


def test_pairs_feed_every_positional_input():
    """A ``forward`` of two positional inputs takes both elements of a pair."""
    q = squeezer.quantize(TwoInputs(), "w8", calib=[(torch.randn(8, 4), torch.full((8, 1), 2.0))])
    assert squeezer.report_of(q).model_output_error is not None


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(input_ids) * attention_mask[..., None])


class Encoding(UserDict):
    """A Mapping that is not a dict, as a tokenizer's ``BatchEncoding``."""


def test_any_mapping_is_a_keyword_batch():
    batch = Encoding(input_ids=torch.randint(0, 50, (4, 6)), attention_mask=torch.ones(4, 6))
    q = squeezer.quantize(KeywordModel(), "w8", calib=[batch])
    assert squeezer.report_of(q).calibration_batches == 1


# runners

@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    squeezer.export(squeezer.quantize(MLP(), "w8"), torch.randn(1, 40), path)
    return path


@pytest.mark.parametrize("value, match", [
    (np.ones((2, 7), np.float32), r"'x' takes float32 of shape \[\?, 40\], got float32 of shape \[2, 7\]"),
    (np.ones((2, 3, 40), np.float32), r"shape \[2, 3, 40\]"),
    (np.ones(40, np.float32), r"shape \[40\]"),
    (np.array([["a"] * 40]), "<U1 values"),
    (np.zeros((0, 40), np.float32), "no rows"),
])
def test_onnx_runner_names_the_input_and_the_expected_shape(onnx_file, value, match):
    run = OnnxModule(onnx_file)
    name = run.inputs[0][0]
    with pytest.raises(ModelError, match=match.replace("'x'", repr(name))):
        run(value)


def test_onnx_runtime_errors_become_model_errors(onnx_file, monkeypatch):
    run = OnnxModule(onnx_file)
    monkeypatch.setattr(run, "shapes", {})  # the runtime itself refuses the input
    with pytest.raises(ModelError, match="the runtime refused the inputs"):
        run(np.ones((2, 7), np.float32))


# malformed files

def test_billion_laughs_are_refused_quickly(tmp_path):
    assert len(LAUGHS) < 400
    (tmp_path / "c.yaml").write_text(LAUGHS)
    (tmp_path / "r.yaml").write_text(LAUGHS)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        QuantConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_recipe(str(tmp_path / "r.yaml"))
    assert time.perf_counter() - start < 2
    cli_error("quantize", "--model", FACTORY, "--preset", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"))
    np.savez(tmp_path / "d.npz", x=np.ones((4, 40), np.float32), y=np.zeros(4, np.int64))
    out = cli_error("compress", "--recipe", str(tmp_path / "r.yaml"), "--model", FACTORY, "--data", str(tmp_path / "d.npz"),
                    "--out", str(tmp_path / "o"))
    assert "expands to more than" in out
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("text, match", [
    ("steps: [", "invalid YAML"),
    ("&a [*a]", "recursive"),
    ("[" * 100 + "]" * 100, "nested deeper"),
    ("{1: 2, a: 3}", "version and steps"),
    ("[{prune: {amount: " + "9" * 500 + "}}]", "amount"),
])
def test_malformed_recipes(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        Recipe.from_yaml(text)
    assert len(str(info.value)) < 400


def test_malformed_config_quotes_an_excerpt(tmp_path):
    (tmp_path / "c.yaml").write_text("{" + ", ".join(f"k{i}: {i}" for i in range(2000)) + ", 7: 1}")
    with pytest.raises(ConfigError, match="unknown config field") as info:
        QuantConfig.from_yaml(tmp_path / "c.yaml")
    assert len(str(info.value)) < 400
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="bin.yaml"):
        QuantConfig.from_yaml(tmp_path / "bin.yaml")


def test_excerpt_is_bounded():
    nested: list = [1] * 9
    for _ in range(40):
        nested = [nested] * 9
    assert len(excerpt(nested)) <= 80 and len(excerpt("x" * 10_000)) <= 80
    assert excerpt("ab") == "'ab'"


@pytest.mark.parametrize("array", [
    np.array([[object()]] * 3, dtype=object), np.array([["a", "b"]] * 3), np.array(["2024-01-01"] * 3, "datetime64[D]"),
])
def test_npz_members_that_are_not_numbers(tmp_path, array):
    path = tmp_path / "c.npz"
    np.savez(path, x=array) if array.dtype != object else np.savez(path, allow_pickle=True, x=array)
    with pytest.raises(DataError, match="c.npz"):
        load_calibration(path)
    cli_error("quantize", "--model", FACTORY, "--calib", str(path), "--out", str(tmp_path / "o"))


def test_big_endian_arrays_load(tmp_path):
    np.save(tmp_path / "be.npy", np.ones((4, 40), ">f4"))
    assert load_calibration(tmp_path / "be.npy")[0].dtype == torch.float32


# messages in the command line's words

def test_cli_names_flags_not_api_arguments(tmp_path):
    out = cli_error("quantize", "--model", FACTORY, "--preset", "w8a8-static", "--out", str(tmp_path / "o"))
    assert "--calib" in out and "calib=" not in out
    with pytest.raises(DataError, match=r"calib=\.\.\.") as info:
        squeezer.quantize(MLP(), "w8a8-static")
    assert info.value.argument == "calib"


def test_cli_prints_brackets_of_messages(tmp_path, monkeypatch):
    import squeezer.io.user_model as user_model

    def missing(*args, **kwargs):
        raise ConfigError("install it with: pip install 'squeezer[tflite]'")

    monkeypatch.setattr(user_model, "load_factory", missing)
    out = cli_error("quantize", "--model", FACTORY, "--out", str(tmp_path / "o"))
    assert "pip install 'squeezer[tflite]'" in out


# re-quantizing

def test_quantizing_a_quantized_model_is_refused():
    q = squeezer.quantize(MLP(), "w4g128")
    with pytest.raises(ConfigError, match="already quantized with 'w4g128'.*quantize the float model"):
        squeezer.quantize(q, "w8")


def test_quantizing_a_packed_model_is_refused():
    packed = squeezer.pack(squeezer.quantize(MLP(), "w8"))
    with pytest.raises(ConfigError, match="packed.*quantize the float model"):
        squeezer.quantize(packed, "w8")
