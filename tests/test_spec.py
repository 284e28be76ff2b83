"""QuantSpec / granularity validation, parsing, serialization and integer ranges."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from squeezer.errors import ConfigError
from squeezer.quant.spec import (
    MAPPINGS,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    granularity_from,
)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bits", [0, 17, -1, 100])
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [True, 4.0, "4", None])
def test_bits_must_be_int(bits):
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits=bits)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("bits", [2, 8, 16])
def test_bits_in_range_accepted(bits):
    assert QuantSpec(bits=bits).bits == bits


@pytest.mark.parametrize("size", [0, -3])
def test_group_size_not_positive_direct(size):
    with pytest.raises(ConfigError, match="group size"):
        PerGroup(size)


@pytest.mark.parametrize("size", [0, -3])
def test_group_size_not_positive_as_int(size):
    with pytest.raises(ConfigError, match="group size"):
        QuantSpec(granularity=size)


@pytest.mark.parametrize("size", [0, -3])
def test_group_size_not_positive_as_string(size):
    """The message must name the culprit (the group size), not only the general syntax."""
    with pytest.raises(ConfigError, match="group size"):
        QuantSpec(granularity=f"group:{size}")


@pytest.mark.parametrize("size", [0, -3])
def test_group_size_not_positive_from_dict(size):
    with pytest.raises(ConfigError, match="group size"):
        QuantSpec.from_dict({"bits": 4, "granularity": {"group": size}})


@pytest.mark.parametrize("size", [1.5, "8", True])
def test_group_size_must_be_int(size):
    with pytest.raises(ConfigError, match="group size"):
        PerGroup(size)


@pytest.mark.parametrize("mapping", ["nonuniform", "Uniform", "", "kmean"])
def test_unknown_mapping(mapping):
    with pytest.raises(ConfigError, match="mapping") as exc:
        QuantSpec(mapping=mapping)
    assert repr(mapping) in str(exc.value)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_binary_needs_one_bit(bits):
    with pytest.raises(ConfigError, match="binary"):
        QuantSpec(bits=bits, mapping="binary")
    assert QuantSpec(bits=1, mapping="binary").bits == 1


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_ternary_needs_two_bits(bits):
    with pytest.raises(ConfigError, match="ternary"):
        QuantSpec(bits=bits, mapping="ternary")
    assert QuantSpec(bits=2, mapping="ternary").bits == 2


@pytest.mark.parametrize("mapping", ["log2", "exp"])
def test_power_mappings_need_two_bits(mapping):
    with pytest.raises(ConfigError, match=mapping):
        QuantSpec(bits=1, mapping=mapping)


def test_one_bit_symmetric_uniform_rejected():
    with pytest.raises(ConfigError, match="binary"):
        QuantSpec(bits=1, symmetric=True)
    # asymmetric / unsigned one-bit grids have a non-zero level and are allowed
    assert QuantSpec(bits=1, symmetric=False).qmax == 1
    assert QuantSpec(bits=1, symmetric=True, signed=False).qmax == 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(mapping="uniform", base=2.0),
        dict(mapping="log2", bits=4, base=2.0),
        dict(mapping="exp", bits=4, base=1.0),
        dict(mapping="exp", bits=4, base=0.5),
        dict(mapping="exp", bits=4, base=-2.0),
    ],
)
def test_base_validation(kw):
    with pytest.raises(ConfigError, match="base"):
        QuantSpec(**kw)


def test_exp_base_accepted():
    assert QuantSpec(bits=4, mapping="exp", base=1.5).base == 1.5
    assert QuantSpec(bits=4, mapping="exp").base is None


# ----------------------------------------------------------------------------- granularity parsing
@pytest.mark.parametrize(
    "value, expected",
    [
        ("tensor", PerTensor()),
        ("token", PerToken()),
        ("channel", PerChannel(0)),
        ("channel:0", PerChannel(0)),
        ("channel:1", PerChannel(1)),
        ("channel:-1", PerChannel(-1)),
        ("group:64", PerGroup(64)),
        ("group:1", PerGroup(1)),
        (128, PerGroup(128)),
        ({"group": 32}, PerGroup(32)),
        ({"channel": 1}, PerChannel(1)),
        (PerGroup(7), PerGroup(7)),
    ],
)
def test_granularity_from(value, expected):
    got = granularity_from(value)
    assert got == expected
    assert type(got) is type(expected)
    assert QuantSpec(granularity=value).granularity == expected


@pytest.mark.parametrize(
    "value", ["", "group", "group:", "group:abc", "tensor:1", "token:2", "channel:x", "row", True, None, 1.5,
              {"group": 1, "channel": 0}, {"block": 4}]
)
def test_granularity_invalid(value):
    with pytest.raises(ConfigError, match="granularity"):
        granularity_from(value)


def test_default_granularity_is_output_channel():
    assert QuantSpec().granularity == PerChannel(0)


# ----------------------------------------------------------------------------- serialization
def test_from_dict_unknown_field_is_named():
    with pytest.raises(ConfigError, match="groupsize") as exc:
        QuantSpec.from_dict({"bits": 4, "groupsize": 128})
    assert "granularity" in str(exc.value)  # the known fields are listed


def test_from_dict_not_a_mapping():
    with pytest.raises(ConfigError):
        QuantSpec.from_dict(["bits", 4])


def test_from_dict_values_are_validated():
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec.from_dict({"bits": 17})


def test_to_dict_granularity_strings():
    assert QuantSpec(granularity=PerTensor()).to_dict()["granularity"] == "tensor"
    assert QuantSpec(granularity=PerToken()).to_dict()["granularity"] == "token"
    assert QuantSpec(granularity=PerChannel(1)).to_dict()["granularity"] == "channel:1"
    assert QuantSpec(granularity=PerGroup(64)).to_dict()["granularity"] == "group:64"


@st.composite
def specs(draw):
    mapping = draw(st.sampled_from(MAPPINGS))
    gran = draw(
        st.one_of(
            st.just(PerTensor()),
            st.just(PerToken()),
            st.builds(PerChannel, st.integers(-3, 3)),
            st.builds(PerGroup, st.integers(1, 4096)),
        )
    )
    kw = dict(
        bits=draw(st.integers(1, 16)),
        symmetric=draw(st.booleans()),
        signed=draw(st.sampled_from([None, True, False])),
        granularity=gran,
        mapping=mapping,
        base=draw(st.one_of(st.none(), st.floats(1.01, 10.0))) if mapping == "exp" else None,
    )
    if mapping == "binary":
        kw["bits"] = 1
    elif mapping == "ternary":
        kw["bits"] = 2
    try:
        return QuantSpec(**kw)
    except ConfigError:
        assume(False)


@settings(max_examples=100, deadline=None)
@given(spec=specs())
def test_dict_round_trip(spec):
    data = spec.to_dict()
    assert set(data) == {"bits", "symmetric", "signed", "granularity", "mapping", "base"}
    assert QuantSpec.from_dict(data) == spec
    # the dict is JSON-ready and survives a JSON round trip too
    assert QuantSpec.from_dict(json.loads(json.dumps(data))) == spec
    assert isinstance(spec.describe(), str) and spec.granularity.describe() in spec.describe()


# ----------------------------------------------------------------------------- integer ranges
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_qmin_qmax(bits):
    half = 2 ** (bits - 1)
    sym = QuantSpec(bits=bits, symmetric=True)
    assert sym.signed is True
    assert (sym.qmin, sym.qmax) == (-(half - 1), half - 1)  # symmetric grid, -2^(b-1) dropped
    asym = QuantSpec(bits=bits, symmetric=False)
    assert asym.signed is False
    assert (asym.qmin, asym.qmax) == (0, 2**bits - 1)
    asym_signed = QuantSpec(bits=bits, symmetric=False, signed=True)
    assert (asym_signed.qmin, asym_signed.qmax) == (-half, half - 1)
    sym_unsigned = QuantSpec(bits=bits, symmetric=True, signed=False)
    assert (sym_unsigned.qmin, sym_unsigned.qmax) == (0, 2**bits - 1)


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(2, 16), symmetric=st.booleans(), signed=st.sampled_from([None, True, False]))
def test_qrange_size(bits, symmetric, signed):
    spec = QuantSpec(bits=bits, symmetric=symmetric, signed=signed)
    n_codes = spec.qmax - spec.qmin + 1
    # every grid uses all 2^b codes except the signed symmetric one, which drops one
    assert n_codes == 2**bits - (1 if spec.signed and spec.symmetric else 0)
    if spec.signed and spec.symmetric:
        assert spec.qmin == -spec.qmax


def test_describe_labels():
    assert QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128)).describe() == "uint4 asym group(128)"
    assert QuantSpec(bits=8).describe() == "int8 sym channel(axis=0)"
    assert QuantSpec(bits=4, mapping="kmeans", granularity="tensor").describe() == "kmeans4 tensor"
    assert QuantSpec(bits=1, mapping="binary").describe().startswith("binary")


def test_is_codebook():
    assert not QuantSpec().is_codebook
    for mapping, bits in [("log2", 4), ("exp", 4), ("kmeans", 4), ("binary", 1), ("ternary", 2)]:
        assert QuantSpec(bits=bits, mapping=mapping).is_codebook


def test_spec_is_frozen():
    spec = QuantSpec()
    with pytest.raises(Exception):
        spec.bits = 4  # type: ignore[misc]
