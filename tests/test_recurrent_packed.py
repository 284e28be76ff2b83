"""Packed LSTM / GRU / RNN: every matrix on integer kernels (the step loop) or, weight-only, the codes unpacked into
torch's fused recurrence; the simulated layer's outputs, codes instead of floats."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import squeezer
from squeezer.errors import ConfigError
from squeezer.io.checkpoint import load, save
from squeezer.kernels import PackReport, packed_kernels
from squeezer.kernels import PATHS
from squeezer.kernels.base import PackedWeight
from squeezer.kernels import recurrent as recurrent_kernels
from squeezer.kernels.recurrent import FUSED, FUSED_NOTE, FusedRecurrent, PackedRecurrent, matrix_pins, unpacker
from squeezer.quant.core import quantize
from squeezer.quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from squeezer.kernels.select import BUCKETS
from squeezer.modules.recurrent_steps import FloatOps, run_recurrent

SIZE = 128  # input and hidden size: every matrix's K is a multiple of the int4 group (128) and of 16
LAYERS = {
    "lstm-2-bi-batch_first": lambda: nn.LSTM(SIZE, SIZE, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj": lambda: nn.LSTM(SIZE, 2 * SIZE, num_layers=2, proj_size=SIZE),
    "gru-2-bi": lambda: nn.GRU(SIZE, SIZE, num_layers=2, bidirectional=True, batch_first=True),
    "rnn-relu-bi": lambda: nn.RNN(SIZE, SIZE, nonlinearity="relu", bidirectional=True),
    "rnn-tanh-no-bias": lambda: nn.RNN(SIZE, SIZE, bias=False, batch_first=True),
}
STEP_KERNEL = {"w8": "int8_weight_bf16", "w4g128": "int4_weight_bf16"}
"""The integer kernel that runs each weight-only preset's recurrent step at batch 1."""
ACTIVATIONS = ("w8a8", "w8a8-tensor", "w8a8-static")
INTEGER = {p.name for p in PATHS if p.integer}


class Seq(nn.Module):
    """The recurrent layer's whole result: ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor | PackedSequence, hx: object = None) -> object:
        return self.rnn(x, hx)


def _model(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Seq(LAYERS[kind]()).eval()
    x = torch.randn(3, 6, SIZE) if model.rnn.batch_first else torch.randn(6, 3, SIZE)
    return model, x


def _quantize(model: nn.Module, x: Tensor, preset: str) -> nn.Module:
    """``preset``, calibrated on three batches like ``x`` (static activations)."""
    return squeezer.quantize(model, preset, calib=[torch.randn_like(x) for _ in range(3)], progress=False)


def _tensors(out: object) -> list[Tensor]:
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [out]


def _rel(a: object, b: object) -> float:
    """The largest relative error over the result's tensors (output, h_n, c_n)."""
    return max(float((x - y).norm() / y.norm()) for x, y in zip(_tensors(a), _tensors(b)))


def _equal(a: object, b: object) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))


def _run(model: nn.Module, x: object, hx: object = None) -> object:
    with torch.no_grad():
        return model(x, hx)


@pytest.mark.parametrize("preset", ["w8", "w4g128", "w8g128", "w3g128", "kmeans-w4"])
@pytest.mark.parametrize("kind", LAYERS)
def test_weight_only_rule_runs_torch_fused_recurrence_on_unpacked_codes(kind: str, preset: str) -> None:
    model, x = _model(kind)
    q = squeezer.quantize(model, preset)
    packed = squeezer.pack(q)
    assert type(packed.rnn.runtime) is FusedRecurrent and packed.rnn.mode == "packed"
    assert _equal(_run(packed, x), _run(q, x))  # the simulation's fused op on the same W^
    assert set(packed.rnn.runtime.describe().values()) == {FUSED} and packed_kernels(packed) == {"rnn": FUSED}
    row = squeezer.report_of(packed, PackReport).layers[0]
    assert row.warning == FUSED_NOTE and row.kernels == packed.rnn.runtime.describe()


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerGroup(64), PerGroup(48)])
def test_unpacker_is_dequantize_bit_for_bit(bits: int, symmetric: bool, granularity: object) -> None:
    torch.manual_seed(0)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity)
    weight = PackedWeight.from_qtensor(quantize(torch.randn(24, 96), spec))
    assert torch.equal(unpacker(weight)(), weight.dequantize())


@pytest.mark.parametrize("preset", STEP_KERNEL)
@pytest.mark.parametrize("kind", LAYERS)
def test_packed_close_to_simulated_on_integer_kernels(kind: str, preset: str) -> None:
    model, x = _model(kind)
    q = squeezer.quantize(model, preset)
    packed = squeezer.pack(q, kernels={"rnn": STEP_KERNEL[preset]})
    assert type(packed.rnn.runtime) is PackedRecurrent and packed.rnn.mode == "packed"
    error = _rel(_run(packed, x), _run(q, x))
    assert 0 < error < 1e-2  # bf16 activations inside the integer kernels
    kernels = packed.rnn.runtime.describe()
    assert set(kernels.values()) == {STEP_KERNEL[preset]}
    row = squeezer.report_of(packed, PackReport).layers[0]
    assert row.name == "rnn" and row.kernels == kernels and row.warning is None


@pytest.mark.parametrize("preset", ACTIVATIONS)
def test_quantized_states_refuse_the_fused_pin(preset: str) -> None:
    model, x = _model("lstm-proj")
    q = _quantize(model, x, preset)
    assert type(squeezer.pack(q).rnn.runtime) is PackedRecurrent  # the rule: states quantized -> the step loop
    with pytest.raises(ConfigError, match=r"kernels\['rnn'\]: 'dequant_fused' runs float states"):
        squeezer.pack(q, kernels={"rnn": FUSED})


def test_fused_pin_is_one_name() -> None:
    model, _ = _model("gru-2-bi")
    q = squeezer.quantize(model, "w8")
    with pytest.raises(ConfigError, match=r"'dequant_fused' runs the whole layer: pin it as one name"):
        squeezer.pack(q, kernels={"rnn": [FUSED] * 32})
    assert type(squeezer.pack(q, kernels={"rnn": FUSED}).rnn.runtime) is FusedRecurrent


@pytest.mark.parametrize("kind", LAYERS)
def test_dequant_path_is_the_simulated_recurrence_bit_for_bit(kind: str) -> None:
    model, x = _model(kind)
    q = squeezer.quantize(model, "w4g128")
    packed = squeezer.pack(q, kernels={"rnn": "dequant_matmul"})
    reference = run_recurrent(q.rnn, FloatOps(q.rnn, q.rnn.quantized_matrices()), x)
    assert _equal(_run(packed, x), reference)
    assert set(packed.rnn.runtime.describe().values()) == {"dequant_matmul"}


def test_warning_names_the_matrices_no_integer_kernel_runs() -> None:
    model, x = _model("gru-2-bi")
    q = squeezer.quantize(model, "w8g128")  # 8-bit groups: no integer kernel
    packed = squeezer.pack(q, kernels={"rnn": "dequant_matmul"})  # the step loop
    warning = squeezer.report_of(packed, PackReport).layers[0].warning
    assert warning.startswith(", ".join(q.rnn.matrix_names) + ": no integer kernel")
    assert _rel(_run(packed, x), _run(q, x)) < 1e-5


@pytest.mark.parametrize("kernels", ["rule", {"rnn": "int8_weight_bf16"}])
def test_packed_sequence_and_initial_state(kernels: object) -> None:
    model, _ = _model("lstm-2-bi-batch_first")
    q = squeezer.quantize(model, "w8")
    packed = squeezer.pack(q, kernels=kernels)
    x, lengths = torch.randn(3, 6, SIZE), torch.tensor([4, 6, 2])
    sequence = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    state = (torch.randn(4, 3, SIZE), torch.randn(4, 3, SIZE))
    out, simulated = _run(packed, sequence, state), _run(q, sequence, state)
    assert isinstance(out[0], PackedSequence) and torch.equal(out[0].batch_sizes, simulated[0].batch_sizes)
    if kernels == "rule":  # dequant_fused: torch's op on the same W^
        assert _equal(out, simulated)
    else:
        assert 0 < _rel(out, simulated) < 1e-2


@pytest.mark.parametrize("kernels", ["rule", {"rnn": "int4_weight_bf16"}])
def test_holds_codes_not_float_matrices(kernels: object) -> None:
    model, x = _model("lstm-proj")
    q = squeezer.quantize(model, "w4g128")
    matrices = q.rnn.matrix_names
    packed = squeezer.pack(q, kernels=kernels)
    rnn = packed.rnn
    assert all(rnn._parameters[m] is None for m in matrices)
    assert all(w.numel() == 0 for n, w in zip(rnn._flat_weights_names, rnn._flat_weights) if n in matrices)
    assert not any(k.startswith("weight") for k in rnn.state_dict())
    codes = sum(w.nbytes for w in rnn.runtime.weights.values())
    floats = sum(getattr(model.rnn, m).numel() * 4 for m in matrices)
    assert codes < floats / 6 and codes <= rnn.runtime.nbytes() < floats / 2
    assert squeezer.report_of(packed, PackReport).layers[0].runtime_bytes == rnn.runtime.nbytes()
    for name, qt in rnn.matrix_qtensors().items():  # the same codes as the simulated layer's
        assert torch.equal(qt.codes, q.rnn.matrix_qtensors()[name].codes)
    assert torch.equal(rnn.quantized_weight(), q.rnn.quantized_weight())
    assert _rel(_run(packed, x), _run(q, x)) < 1e-2


def test_packed_kernels_reproduce_the_choice() -> None:
    model, x = _model("gru-2-bi")
    q = squeezer.quantize(model, "w8")
    per_matrix = ["int8_weight_bf16"] * (len(BUCKETS) - 1) + ["dequant_matmul"]
    packed = squeezer.pack(q, kernels={"rnn": per_matrix * len(q.rnn.matrix_names)})
    kernels = packed_kernels(packed)["rnn"]
    assert kernels == per_matrix * len(q.rnn.matrix_names)
    assert kernels == list(packed.rnn.runtime.describe().values())
    again = squeezer.pack(q, kernels={"rnn": kernels})
    assert again.rnn.runtime.describe() == packed.rnn.runtime.describe()
    assert _equal(_run(again, x), _run(packed, x))


def test_pins_are_checked_per_matrix() -> None:
    model, _ = _model("gru-2-bi")
    q = squeezer.quantize(model, "w4g128")
    with pytest.raises(ConfigError, match=r"'rnn.weight_ih_l0'.*int8_weight_bf16"):
        squeezer.pack(q, kernels={"rnn": "int8_weight_bf16"})
    with pytest.raises(ConfigError, match=r"kernels\['rnn'\] must be a path name or a list of 32"):
        squeezer.pack(q, kernels={"rnn": ["dequant_matmul"] * 4})
    assert matrix_pins("rnn", ("weight_ih_l0", "weight_hh_l0"), list("abcdefgh")) == \
        {"rnn.weight_ih_l0": list("abcd"), "rnn.weight_hh_l0": list("efgh")}


@pytest.mark.parametrize("kernels", ["rule", "step loop"])
@pytest.mark.parametrize("preset", ["w8", "w4g128"])
@pytest.mark.parametrize("kind", ["lstm-proj", "gru-2-bi", "rnn-tanh-no-bias"])
def test_save_load_packed_bit_identical(kind: str, preset: str, kernels: str, tmp_path) -> None:
    model, x = _model(kind)
    pins = "rule" if kernels == "rule" else {"rnn": STEP_KERNEL[preset]}
    packed = squeezer.pack(squeezer.quantize(model, preset), kernels=pins)
    assert type(packed.rnn.runtime) is (FusedRecurrent if kernels == "rule" else PackedRecurrent)
    save(packed, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt", lambda: _model(kind)[0], packed=True)
    assert restored.rnn.is_packed and packed_kernels(restored) == packed_kernels(packed)
    assert _equal(_run(restored, x), _run(packed, x))


@pytest.mark.parametrize("preset", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["lstm-2-bi-batch_first", "lstm-proj", "gru-2-bi", "rnn-relu-bi"])
def test_quantized_states_on_int8_activation_kernels(kind: str, preset: str) -> None:
    model, x = _model(kind)
    q = _quantize(model, x, preset)
    assert q.rnn.scheme.activation_mode in ("dynamic", "static")
    packed = squeezer.pack(q)
    simulated = _run(q, x)
    assert 0 < _rel(_run(packed, x), simulated) < 2e-2 < _rel(simulated, _run(model, x)) * 4
    kernels = packed.rnn.runtime.describe()
    assert set(kernels.values()) <= INTEGER | {"dequant_matmul"}
    for label, path in kernels.items():  # every product that quantizes its input runs an int8-activation kernel
        multiplies_m = label.startswith("weight_hr") and preset != "w8a8-static"  # dynamic: m stays float
        if not multiplies_m:
            assert path in INTEGER and path != "int8_weight_bf16" and path != "int4_weight_bf16", label
    pinned = _run(squeezer.pack(q, kernels={"rnn": "dequant_matmul"}), x)
    if kind.startswith("gru") and preset != "w8a8-static":  # h_{t-1} quantized twice: its grid re-derived from fq(h)
        assert _rel(pinned, simulated) < 1e-6
    else:  # the same products and states as the simulation, bit for bit
        assert _equal(pinned, simulated)


@pytest.mark.parametrize("preset", ACTIVATIONS)
def test_save_load_packed_activations_bit_identical(preset: str, tmp_path) -> None:
    model, x = _model("gru-2-bi")
    q = _quantize(model, x, preset)
    packed = squeezer.pack(q)
    save(packed, tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt", lambda: _model("gru-2-bi")[0], packed=True)
    assert restored.rnn.state_qparams.keys() == q.rnn.state_qparams.keys()
    assert packed_kernels(restored) == packed_kernels(packed)
    assert _equal(_run(restored, x), _run(packed, x))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernels", ["rule", "int_mm"])
@pytest.mark.parametrize("kind", ["lstm-2-bi-batch_first", "gru-2-bi"])
def test_compiled_loop_is_the_python_loop_bit_for_bit(kind: str, kernels: str, batch: int, monkeypatch) -> None:
    model, _ = _model(kind)
    x = torch.randn(batch, 6, SIZE)
    q = squeezer.quantize(model, "w8a8")
    packed = squeezer.pack(q, kernels="rule" if kernels == "rule" else {"rnn": kernels})
    runtime = packed.rnn.runtime
    assert all(runtime.compiled_loop(key, batch) is not None for key in ("l0", "l0_reverse", "l1", "l1_reverse"))
    loop_name = "lstm_loop" if kind.startswith("lstm") else "gru_loop"
    compiled, calls = getattr(recurrent_kernels, loop_name), []
    monkeypatch.setattr(recurrent_kernels, loop_name, lambda *a: calls.append(1) or compiled(*a))
    state = (torch.randn(4, batch, SIZE), torch.randn(4, batch, SIZE))
    hx = state if kind.startswith("lstm") else state[0]
    for args in ((x,), (x, hx), (x[0],)):  # batched, a given state, unbatched
        python_loop = run_recurrent(packed.rnn, runtime, *args)
        assert not calls  # the reference is the Python loop ...
        assert _equal(_run(packed, *args), python_loop)
        assert len(calls) == 4  # ... the packed layer runs each of its 4 directions on the compiled loop
        calls.clear()
    assert 0 < _rel(_run(packed, x), _run(q, x)) < 1e-2  # the kernels' bf16 / int8 codes, as the Python loop


@pytest.mark.parametrize("preset", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["lstm-proj", "gru-2-bi", "rnn-relu-bi"])
def test_compiled_loop_only_where_it_is_the_python_loop(kind: str, preset: str) -> None:
    model, x = _model(kind)
    runtime = squeezer.pack(_quantize(model, x, preset)).rnn.runtime
    compiled = runtime.compiled_loop("l0", 1) is not None
    assert compiled == (kind == "gru-2-bi" and preset == "w8a8")  # w8a8 LSTM / GRU without proj_size only
    assert runtime.compiled_loop("l0", 1, torch.float64) is None  # fp64 states: the Python loop
