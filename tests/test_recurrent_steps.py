"""The explicit time-step recurrence reproduces torch's nn.LSTM / nn.GRU / nn.RNN for every option."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from squeezer.modules.recurrent_steps import STATE_NAMES, FloatOps, cell_kind, layer_keys, run_recurrent

LAYERS = {
    "lstm": lambda: nn.LSTM(6, 8),
    "lstm-2-bi-batch_first": lambda: nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj-bi": lambda: nn.LSTM(6, 8, num_layers=2, proj_size=5, bidirectional=True),
    "lstm-no-bias": lambda: nn.LSTM(6, 8, bias=False),
    "gru-2-bi": lambda: nn.GRU(6, 8, num_layers=2, bidirectional=True, batch_first=True),
    "gru": lambda: nn.GRU(6, 8),
    "rnn-tanh-2": lambda: nn.RNN(6, 8, num_layers=2),
    "rnn-relu-bi-batch_first": lambda: nn.RNN(6, 8, nonlinearity="relu", bidirectional=True, batch_first=True),
}


def _layer(name: str) -> nn.RNNBase:
    torch.manual_seed(0)
    return LAYERS[name]().eval()


def _flat(out: object) -> list[Tensor]:
    """Every tensor of a recurrent layer's result, in order (a packed output's data and indices)."""
    if isinstance(out, PackedSequence):
        return [t for t in out if t is not None]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


def _assert_same(got: object, want: object) -> None:
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _state(layer: nn.RNNBase, batch: int | None) -> object:
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    lead = (rows,) if batch is None else (rows, batch)
    h = torch.randn(*lead, layer.proj_size or layer.hidden_size)
    return (h, torch.randn(*lead, layer.hidden_size)) if isinstance(layer, nn.LSTM) else h


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("given_state", [False, True])
def test_padded_input_matches_torch(name: str, given_state: bool) -> None:
    layer = _layer(name)
    x = torch.randn(3, 7, 6) if layer.batch_first else torch.randn(7, 3, 6)
    hx = _state(layer, 3) if given_state else None
    _assert_same(run_recurrent(layer, FloatOps(layer), x, hx), layer(x, hx))


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("given_state", [False, True])
def test_packed_unsorted_lengths_match_torch(name: str, given_state: bool) -> None:
    layer = _layer(name)
    lengths = torch.tensor([4, 7, 2, 5])
    x = torch.randn(4, 7, 6) if layer.batch_first else torch.randn(7, 4, 6)
    packed = pack_padded_sequence(x, lengths, batch_first=layer.batch_first, enforce_sorted=False)
    assert packed.sorted_indices is not None and not torch.equal(packed.sorted_indices, torch.arange(4))
    hx = _state(layer, 4) if given_state else None
    _assert_same(run_recurrent(layer, FloatOps(layer), packed, hx), layer(packed, hx))


@pytest.mark.parametrize("name", ["lstm-proj-bi", "gru-2-bi", "rnn-tanh-2"])
def test_packed_sorted_lengths_match_torch(name: str) -> None:
    layer = _layer(name)
    x = torch.randn(3, 5, 6) if layer.batch_first else torch.randn(5, 3, 6)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 1]), batch_first=layer.batch_first)
    _assert_same(run_recurrent(layer, FloatOps(layer), packed), layer(packed))


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("given_state", [False, True])
def test_unbatched_input_matches_torch(name: str, given_state: bool) -> None:
    layer = _layer(name)
    x = torch.randn(7, 6)
    hx = _state(layer, None) if given_state else None
    _assert_same(run_recurrent(layer, FloatOps(layer), x, hx), layer(x, hx))


@pytest.mark.parametrize("name", ["lstm-2-bi-batch_first", "gru-2-bi", "rnn-tanh-2"])
def test_dropout_between_layers(name: str) -> None:
    torch.manual_seed(0)
    kind = type(LAYERS[name]())
    options = {k: getattr(LAYERS[name](), k) for k in ("num_layers", "bidirectional", "batch_first")}
    layer = kind(6, 8, dropout=0.5, **options)
    x = torch.randn(3, 7, 6)
    layer.eval()  # evaluation: no dropout, torch's result
    _assert_same(run_recurrent(layer, FloatOps(layer), x), layer(x))
    layer.train()  # training: the layer outputs differ from evaluation's, and two draws differ
    train_a, train_b = run_recurrent(layer, FloatOps(layer), x)[0], run_recurrent(layer, FloatOps(layer), x)[0]
    assert not torch.allclose(train_a, layer.eval()(x)[0]) and not torch.allclose(train_a, train_b)
    layer.dropout = 0.0  # no dropout: training equals torch's training
    _assert_same(run_recurrent(layer.train(), FloatOps(layer), x), layer(x))


def test_float_ops_read_given_matrices() -> None:
    layer = _layer("lstm-proj-bi")
    other = _layer("lstm-proj-bi")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    weights = {n: p for n, p in other.named_parameters() if n.startswith("weight_")}
    for n, p in layer.named_parameters():
        if n.startswith("bias_"):
            getattr(other, n).data.copy_(p)  # the given matrices, the layer's biases
    x = torch.randn(7, 3, 6)
    _assert_same(run_recurrent(layer, FloatOps(layer, weights), x), other(x))


class Recording(FloatOps):
    """FloatOps that records each (state name, key, shape) it sees."""

    def __init__(self, layer: nn.RNNBase) -> None:
        super().__init__(layer)
        self.seen: set[tuple[str, str]] = set()

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        self.seen.add((name, key))
        return t


@pytest.mark.parametrize("name", ["lstm", "lstm-proj-bi", "gru-2-bi", "rnn-relu-bi-batch_first"])
def test_every_state_hooked_for_every_key(name: str) -> None:
    layer = _layer(name)
    ops = Recording(layer)
    run_recurrent(layer, ops, torch.randn(3, 4, 6))
    names = [s for s in STATE_NAMES[cell_kind(layer)] if s != "m" or layer.proj_size]
    assert ops.seen == {(s, k) for s in names for k in layer_keys(layer)}


def test_state_hook_changes_output() -> None:
    layer = _layer("gru-2-bi")

    class Halving(FloatOps):
        def state(self, name: str, key: str, t: Tensor) -> Tensor:
            return t * 0.5 if (name, key) == ("h", "l1_reverse") else t

    x = torch.randn(3, 4, 6)
    assert not torch.allclose(run_recurrent(layer, Halving(layer), x)[0], layer(x)[0])


def test_gradients_reach_every_parameter() -> None:
    layer = _layer("lstm-proj-bi").train()
    run_recurrent(layer, FloatOps(layer), torch.randn(5, 2, 6))[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_bad_state_shape_raises_like_torch() -> None:
    layer = _layer("lstm")
    with pytest.raises(RuntimeError, match="hidden"):
        run_recurrent(layer, FloatOps(layer), torch.randn(7, 3, 6), (torch.zeros(1, 2, 8), torch.zeros(1, 3, 8)))
