"""Data-parallel calibration: N processes, each with its share of the batches, quantize like one process."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import squeezer
from squeezer.algorithms.matrices import matrix_views
from squeezer.distributed import LOCAL, make_reducer
from squeezer.errors import ConfigError
from squeezer.modules import QuantRecurrent, quant_layers
from squeezer.quant.observers import make_observer, reduce_observers
from squeezer.quant.spec import QuantSpec
from squeezer.resolve import resolve_config

BATCHES = 4


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(12, 24, batch_first=True)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 32))
    x = torch.randn(BATCHES * 16, 128) * torch.linspace(0.2, 3.0, 128)
    return model, list(x.split(16))


def _lstm() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(1)
    return Recurrent(), list(torch.randn(BATCHES * 4, 6, 12).split(4))


CASES = {  # name -> (model and batches, config)
    "mlp-gptq": (_mlp, "w4g128-gptq"),
    "mlp-awq": (_mlp, "w4g128-awq"),
    "mlp-static-minmax": (_mlp, "w8a8-static"),
    "mlp-static-percentile-gptq": (_mlp, replace(resolve_config("w8a8-static-gptq"), observer="percentile")),
    "lstm-static-gptq": (_lstm, "w8a8-static-gptq"),
    "lstm-static-entropy": (_lstm, replace(resolve_config("w8a8-static"), observer="entropy")),
}


def _result(name: str, rank: int, world: int, distributed: bool) -> dict[str, torch.Tensor]:
    """The quantized weights of every layer (every matrix of a recurrent one) and the model's output."""
    make, config = CASES[name]
    model, batches = make()
    share = len(batches) // world
    q = squeezer.quantize(model, config, batches[rank * share:(rank + 1) * share], progress=False,
                          distributed=distributed)
    out: dict[str, torch.Tensor] = {}
    for layer_name, layer in quant_layers(q).items():
        views = matrix_views(layer) if isinstance(layer, QuantRecurrent) else {"weight": layer}
        for view_name, view in views.items():
            out[f"{name}/{layer_name}/{view_name}"] = view.quantized_weight().detach().contiguous()
    with torch.no_grad():
        out[f"{name}/output"] = q(torch.cat(batches)).contiguous()
    return out


def _in_group(rank: int, world: int, store: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The results of ``names`` by process ``rank`` of a gloo group of ``world`` (its share of the batches)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        return {k: v for name in names for k, v in _result(name, rank, world, True).items()}
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, store: str, target: str) -> None:
    torch.set_num_threads(1)
    save_file(_in_group(rank, world, store, list(CASES)), f"{target}.{rank}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    """Every case by each of 2 spawned processes, each with half of the batches."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(tmp / "result")), nprocs=2, join=True)
    return [load_file(f"{tmp / 'result'}.{rank}") for rank in range(2)]


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    # the same codes and scales; Hessian sums differ in float64 summation order only
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_processes_agree_with_each_other(two_ranks: list[dict[str, torch.Tensor]]) -> None:
    _assert_close(two_ranks[1], two_ranks[0])


@pytest.mark.parametrize("name", ["mlp-gptq", "mlp-awq", "mlp-static-minmax", "lstm-static-gptq"])
def test_two_processes_match_one_process(two_ranks: list[dict[str, torch.Tensor]], name: str) -> None:
    """Sums, counts and min / max reduce exactly: two halves give what one process gives on all batches."""
    want = _result(name, 0, 1, False)
    _assert_close({k: two_ranks[0][k] for k in want}, want)


def test_histogram_observers_match_one_process_on_the_common_range(
        two_ranks: list[dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """Histograms are counted over the range agreed across processes: one process under the same protocol
    (a group of one) counts the same bins."""
    want = _in_group(0, 1, str(tmp_path / "store"), ["mlp-static-percentile-gptq", "lstm-static-entropy"])
    _assert_close({k: two_ranks[0][k] for k in want}, want)


def test_moving_average_is_refused_across_processes() -> None:
    observer = make_observer("moving_average", QuantSpec(bits=8))
    observer.update(torch.randn(10))
    assert observer.reduce(LOCAL) is False  # one process: nothing to combine
    with pytest.raises(ConfigError, match="MovingAverageMinMaxObserver"):
        reduce_observers([observer], replace(LOCAL, active=True), lambda: None)


def test_distributed_needs_an_initialised_group() -> None:
    with pytest.raises(ConfigError, match="not initialised"):
        make_reducer(True)
