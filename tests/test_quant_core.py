"""Property and worked-example tests of the quantizer core (squeezer.quant.core / levels / metrics).

Expected values are derived from the documented formulas, recomputed independently here
(own broadcasting of parameters, own level tables), never copied from a run of the code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from squeezer.quant import levels as L
from squeezer.quant.core import (
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    representable_range,
)
from squeezer.quant.metrics import ErrorAccumulator, ErrorStats, cosine, mse, sqnr_db
from squeezer.quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

FAST = settings(max_examples=60, deadline=None)
FEW = settings(max_examples=30, deadline=None)

F32_EPS = 2.0**-23


# ----------------------------------------------------------------------------- helpers
def expand_param(param: torch.Tensor, shape: torch.Size, gran) -> torch.Tensor:
    """Broadcast a per-block parameter of ``param_shape`` to one value per element of ``shape``.

    Written from the granularity definitions in spec.py, independently of blocks.py.
    """
    shape = torch.Size(shape)
    nd = len(shape)
    if isinstance(gran, PerTensor):
        assert param.numel() == 1
        return param.reshape(()).expand(shape)
    if isinstance(gran, PerChannel):
        ax = gran.axis % nd
        assert param.shape == (shape[ax],)
        view = [1] * nd
        view[ax] = shape[ax]
        return param.reshape(view).expand(shape)
    if isinstance(gran, PerToken):
        return param.reshape(*shape[:-1], 1).expand(shape)
    if isinstance(gran, PerGroup):
        rows = shape[0] if nd > 1 else 1
        k = shape.numel() // rows
        groups = -(-k // gran.size)
        assert param.shape == (rows, groups)
        return param.repeat_interleave(gran.size, dim=1)[:, :k].reshape(shape)
    raise AssertionError(gran)


def uniform_range_elements(spec: QuantSpec, qp: QParams, x: torch.Tensor):
    """Per-element scale and representable [lo, hi] from the documented uniform formulas."""
    g = spec.granularity
    scale = expand_param(qp.scale, x.shape, g)
    zero = 0.0 if qp.zero_point is None else expand_param(qp.zero_point.float(), x.shape, g)
    return scale, (spec.qmin - zero) * scale, (spec.qmax - zero) * scale


def values(shape, lo=-1e3, hi=1e3):
    return hnp.arrays(
        np.float32,
        shape,
        elements=st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    )


@st.composite
def tensor_and_granularity(draw, allow_token: bool = False):
    """A float32 tensor plus a granularity that applies to it (tensor, channel 0/1, group, token)."""
    kinds = ["tensor", "channel0", "channel1", "group"] + (["token"] if allow_token else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "tensor":
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        gran = PerTensor()
    elif kind in ("channel0", "channel1"):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=3)))
        gran = PerChannel(0 if kind == "channel0" else 1)
    elif kind == "token":
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        gran = PerToken()
    else:
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        rows = shape[0] if len(shape) > 1 else 1
        k = int(np.prod(shape)) // rows
        divisors = [d for d in range(1, k + 1) if k % d == 0]
        non_divisors = [d for d in range(1, k + 4) if k % d != 0]
        if draw(st.booleans()):
            size = draw(st.sampled_from(divisors))
        else:
            size = draw(st.sampled_from(non_divisors))
        gran = PerGroup(size)
    x = torch.from_numpy(draw(values(shape)).copy())
    return x, gran


def all_mappings_spec(draw, gran):
    mapping = draw(st.sampled_from(["uniform", "log2", "exp", "kmeans", "binary", "ternary"]))
    if mapping == "binary":
        return QuantSpec(bits=1, mapping="binary", granularity=gran)
    if mapping == "ternary":
        return QuantSpec(bits=2, mapping="ternary", granularity=gran)
    if mapping == "uniform":
        sym = draw(st.booleans())
        return QuantSpec(bits=draw(st.integers(2, 16)), symmetric=sym, granularity=gran)
    if mapping == "exp":
        base = draw(st.one_of(st.none(), st.floats(1.1, 4.0)))
        return QuantSpec(bits=draw(st.integers(2, 6)), mapping="exp", base=base, granularity=gran)
    return QuantSpec(bits=draw(st.integers(2, 6)), mapping=mapping, granularity=gran)


def gaussian(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype)


# ----------------------------------------------------------------------------- uniform
@FAST
@given(data=st.data(), bits=st.integers(2, 16), symmetric=st.booleans(), signed=st.sampled_from([None, True, False]))
def test_uniform_error_at_most_half_step_inside_range(data, bits, symmetric, signed):
    x, gran = data.draw(tensor_and_granularity(allow_token=True))
    spec = QuantSpec(bits=bits, symmetric=symmetric, signed=signed, granularity=gran)
    qt = quantize(x, spec)
    x_hat = dequantize(qt)
    assert x_hat.shape == x.shape

    scale, lo, hi = uniform_range_elements(spec, qt.qparams, x)
    r_lo, r_hi = representable_range(spec, qt.qparams)
    torch.testing.assert_close(expand_param(r_lo, x.shape, gran), lo, rtol=1e-6, atol=0)
    torch.testing.assert_close(expand_param(r_hi, x.shape, gran), hi, rtol=1e-6, atol=0)

    err = (x_hat.double() - x.double()).abs()
    tol = 4 * F32_EPS * (x.double().abs() + x_hat.double().abs()) + 1e-30
    bound = scale.double() / 2 + tol
    inside = (x >= lo) & (x <= hi)
    assert bool((err[inside] <= bound[inside]).all()), (err - bound)[inside].max()

    # With min/max parameters the range covers the data to within half a step, so unless the
    # grid is unsigned-symmetric (negatives clip to 0) *every* element is within S/2.
    if spec.signed or not spec.symmetric:
        assert bool((err <= bound).all()), (err - bound).max()
    # Reconstructions lie on the grid: (x_hat / S) + Z is an integer code in [qmin, qmax].
    assert bool(((x_hat >= lo - tol) & (x_hat <= hi + tol)).all())


@FAST
@given(data=st.data(), bits=st.integers(2, 16), symmetric=st.booleans(), shrink=st.floats(0.05, 0.9))
def test_uniform_explicit_narrow_range_clips_and_keeps_bound(data, bits, symmetric, shrink):
    """With a calibrated range narrower than the data, inside elements keep |err| <= S/2 and
    outside elements are clipped to the end codes."""
    x, gran = data.draw(tensor_and_granularity())
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=gran)
    from squeezer.quant.blocks import to_blocks

    b = to_blocks(x, gran)
    lo = b.data.amin(1).reshape(b.param_shape) * shrink
    hi = b.data.amax(1).reshape(b.param_shape) * shrink
    qp = compute_qparams(x, spec, lo, hi)
    qt = quantize(x, spec, qp)
    codes = qt.codes.long()
    assert bool(((codes >= spec.qmin) & (codes <= spec.qmax)).all())
    x_hat = dequantize(qt)
    scale, r_lo, r_hi = uniform_range_elements(spec, qp, x)
    err = (x_hat.double() - x.double()).abs()
    tol = 4 * F32_EPS * (x.double().abs() + x_hat.double().abs()) + 1e-30
    inside = (x >= r_lo) & (x <= r_hi)
    assert bool((err[inside] <= (scale.double() / 2 + tol)[inside]).all())
    above, below = x > r_hi + scale / 2, x < r_lo - scale / 2
    torch.testing.assert_close(x_hat[above], r_hi[above], rtol=1e-6, atol=0)
    torch.testing.assert_close(x_hat[below], r_lo[below], rtol=1e-6, atol=0)


@FAST
@given(data=st.data(), bits=st.integers(2, 16), signed=st.sampled_from([None, True, False]))
def test_asymmetric_zero_is_exact(data, bits, signed):
    x, gran = data.draw(tensor_and_granularity(allow_token=True))
    flat = x.flatten().clone()
    idx = data.draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=flat.numel()))
    flat[idx] = 0.0
    x = flat.reshape(x.shape)
    spec = QuantSpec(bits=bits, symmetric=False, signed=signed, granularity=gran)
    x_hat = dequantize(quantize(x, spec))
    assert bool((x_hat[x == 0] == 0).all()), x_hat[x == 0]
    # and the zero point itself is a valid code
    zp = compute_qparams(x, spec).zero_point
    assert bool(((zp >= spec.qmin) & (zp <= spec.qmax)).all())


@FAST
@given(data=st.data(), bits=st.integers(1, 16), symmetric=st.booleans(), signed=st.sampled_from([None, True, False]))
def test_uniform_codes_inside_qmin_qmax(data, bits, symmetric, signed):
    x, gran = data.draw(tensor_and_granularity(allow_token=True))
    try:
        spec = QuantSpec(bits=bits, symmetric=symmetric, signed=signed, granularity=gran)
    except ValueError:
        assume(False)
    # Also force clipping with explicitly shrunk qparams.
    qp = compute_qparams(x, spec)
    for qparams in (qp, QParams(qp.scale / 3, qp.zero_point)):
        qt = quantize(x, spec, qparams)
        assert qt.codes.shape == x.shape
        assert not qt.codes.dtype.is_floating_point
        codes = qt.codes.long()
        assert bool(((codes >= spec.qmin) & (codes <= spec.qmax)).all())


def test_uniform_symmetric_hand_example():
    # int4 symmetric: qmax = 7, S = 3.5 / 7 = 0.5; codes round(x / 0.5)
    x = torch.tensor([[-3.5, -1.2, 0.0, 0.26, 3.5]])
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerTensor())
    qt = quantize(x, spec)
    assert qt.qparams.scale.item() == pytest.approx(0.5)
    assert qt.codes.tolist() == [[-7, -2, 0, 1, 7]]
    torch.testing.assert_close(dequantize(qt), torch.tensor([[-3.5, -1.0, 0.0, 0.5, 3.5]]))


def test_uniform_asymmetric_hand_example():
    # uint2 asymmetric on [-1, 2]: S = 3 / 3 = 1, Z = 0 - round(-1 / 1) = 1
    x = torch.tensor([-1.0, 0.0, 0.4, 0.6, 2.0])
    spec = QuantSpec(bits=2, symmetric=False, granularity=PerTensor())
    qt = quantize(x, spec)
    assert qt.qparams.scale.item() == pytest.approx(1.0)
    assert qt.qparams.zero_point.item() == 1
    assert qt.codes.tolist() == [0, 1, 1, 2, 3]
    torch.testing.assert_close(dequantize(qt), torch.tensor([-1.0, 0.0, 0.0, 1.0, 2.0]))


# ----------------------------------------------------------------------------- per-channel / per-group
@FAST
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4)),
    axis=st.sampled_from([0, 1, -1]),
    symmetric=st.booleans(),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_per_channel_params_are_per_slice(shape, axis, symmetric, bits, seed):
    """Each channel's parameters equal the per-tensor parameters of that channel's slice."""
    x = gaussian(shape, seed) * (1 + torch.arange(shape[axis]).float()).reshape(
        [shape[axis] if d == axis % 3 else 1 for d in range(3)]
    )
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=PerChannel(axis))
    qp = compute_qparams(x, spec)
    assert qp.scale.shape == (shape[axis],)
    whole = QuantSpec(bits=bits, symmetric=symmetric, granularity=PerTensor())
    x_hat = dequantize(quantize(x, spec))
    for c in range(shape[axis]):
        sl = x.select(axis, c)
        ref = compute_qparams(sl, whole)
        torch.testing.assert_close(qp.scale[c], ref.scale.reshape(()), rtol=1e-6, atol=0)
        if not symmetric:
            assert qp.zero_point[c].item() == ref.zero_point.item()
        torch.testing.assert_close(x_hat.select(axis, c), dequantize(quantize(sl, whole)), rtol=1e-6, atol=1e-7)


GROUP_MAPPINGS = [
    dict(bits=4, symmetric=True),
    dict(bits=3, symmetric=False),
    dict(bits=1, mapping="binary"),
    dict(bits=2, mapping="ternary"),
    dict(bits=3, mapping="log2"),
    dict(bits=3, mapping="exp", base=1.7),
]


@FAST
@given(
    rows=st.integers(1, 4),
    k=st.integers(1, 20),
    size=st.integers(1, 24),
    kw=st.sampled_from(GROUP_MAPPINGS),
    seed=st.integers(0, 2**16),
)
def test_per_group_params_are_per_group(rows, k, size, kw, seed):
    """qparams have shape (rows, ceil(K/g)); every group -- including a shorter last one --
    gets exactly the parameters it would get quantized on its own (no fallback, no padding leak)."""
    x = gaussian((rows, k), seed) + 0.3
    spec = QuantSpec(granularity=PerGroup(size), **kw)
    groups = -(-k // size)
    qp = compute_qparams(x, spec)
    assert qp.scale.shape == (rows, groups)
    if qp.zero_point is not None:
        assert qp.zero_point.shape == (rows, groups)
    alone = QuantSpec(granularity=PerTensor(), **kw)
    x_hat = dequantize(quantize(x, spec))
    assert x_hat.shape == x.shape
    for r in range(rows):
        for g in range(groups):
            sl = x[r, g * size : (g + 1) * size]
            ref = compute_qparams(sl, alone)
            torch.testing.assert_close(qp.scale[r, g], ref.scale.reshape(()), rtol=1e-6, atol=0)
            if qp.zero_point is not None:
                assert qp.zero_point[r, g].item() == ref.zero_point.item()
            torch.testing.assert_close(
                x_hat[r, g * size : (g + 1) * size], dequantize(quantize(sl, alone)), rtol=1e-6, atol=1e-7
            )


@FAST
@given(
    rows=st.integers(1, 4),
    groups_full=st.integers(1, 4),
    size=st.integers(2, 9),
    tail=st.integers(1, 8),
    kw=st.sampled_from(GROUP_MAPPINGS[:5] + [dict(bits=3, mapping="kmeans")]),
    seed=st.integers(0, 2**16),
    bump=st.floats(2.0, 50.0),
)
def test_per_group_short_last_group_is_independent(rows, groups_full, size, tail, kw, seed, bump):
    """K = groups_full * g + tail (tail < g): changing an element of the last group changes only
    that row's last-group parameters."""
    assume(tail < size)
    k = groups_full * size + tail
    x = gaussian((rows, k), seed)
    spec = QuantSpec(granularity=PerGroup(size), **kw)
    qp = compute_qparams(x, spec)
    assert qp.scale.shape == (rows, groups_full + 1)
    r = seed % rows
    y = x.clone()
    y[r, -1] = bump * (1 + x[r].abs().max())  # new max of its group -> its params must change
    qp2 = compute_qparams(y, spec)
    changed = torch.zeros(rows, groups_full + 1, dtype=torch.bool)
    changed[r, -1] = True
    if spec.mapping == "kmeans":
        lv1 = qp.levels.reshape(rows, groups_full + 1, -1)
        lv2 = qp2.levels.reshape(rows, groups_full + 1, -1)
        assert torch.equal(lv1[~changed], lv2[~changed])
        assert not torch.equal(lv1[r, -1], lv2[r, -1])
    else:
        assert torch.equal(qp.scale[~changed], qp2.scale[~changed])
        assert qp.scale[r, -1] != qp2.scale[r, -1]
        if qp.zero_point is not None:
            assert torch.equal(qp.zero_point[~changed], qp2.zero_point[~changed])
    # Elements outside the changed group reconstruct identically.
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[r, groups_full * size :] = False
    assert torch.equal(dequantize(quantize(x, spec))[keep], dequantize(quantize(y, spec))[keep])


def test_per_group_3d_weight_flattens_input_dims():
    # (rows=2, 3, 5) -> K = 15, g = 4 -> 4 groups, last one of 3 elements
    x = gaussian((2, 3, 5), 0)
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerGroup(4))
    qp = compute_qparams(x, spec)
    assert qp.scale.shape == (2, 4)
    flat = x.reshape(2, 15)
    expected = torch.stack([flat[:, i : i + 4].abs().amax(1) for i in range(0, 15, 4)], dim=1) / 7
    torch.testing.assert_close(qp.scale, expected)


# ----------------------------------------------------------------------------- codebooks
@FAST
@given(data=st.data())
def test_codebook_codes_inside_level_table(data):
    x, gran = data.draw(tensor_and_granularity(allow_token=True))
    spec = all_mappings_spec(data.draw, gran)
    if not spec.is_codebook:
        assume(False)
    qt = quantize(x, spec)
    lv = qt.qparams.levels
    n_levels = lv.shape[-1]
    expected_n = {"binary": 2, "ternary": 3, "kmeans": 2**spec.bits}.get(spec.mapping, 2**spec.bits - 1)
    assert n_levels == expected_n
    assert bool((lv[..., 1:] >= lv[..., :-1]).all()), "level tables must be sorted"
    codes = qt.codes.long()
    assert qt.codes.shape == x.shape
    assert bool(((codes >= 0) & (codes < n_levels)).all())


@FAST
@given(data=st.data())
def test_fake_quantize_equals_dequantize_quantize(data):
    x, gran = data.draw(tensor_and_granularity(allow_token=True))
    spec = all_mappings_spec(data.draw, gran)
    expected = dequantize(quantize(x, spec))
    assert torch.equal(fake_quantize(x, spec), expected)
    xg = x.clone().requires_grad_(True)
    out = fake_quantize(xg, spec)
    assert out.requires_grad
    assert torch.equal(out.detach(), expected)


@FAST
@given(data=st.data(), bits=st.integers(2, 12), symmetric=st.booleans(), shrink=st.floats(0.1, 1.0))
def test_ste_uniform_gradient_is_range_indicator(data, bits, symmetric, shrink):
    x, gran = data.draw(tensor_and_granularity(allow_token=True))
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=gran)
    qp = compute_qparams(x, spec)
    qp = QParams(qp.scale * shrink, qp.zero_point)  # narrower grid: some elements fall outside
    _, lo, hi = uniform_range_elements(spec, qp, x)
    inside = ((x >= lo) & (x <= hi)).float()
    xg = x.clone().requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (fake_quantize(xg, spec, qp) * upstream).sum().backward()
    torch.testing.assert_close(xg.grad, upstream * inside, rtol=0, atol=0)
    assert set(torch.unique(inside).tolist()) <= {0.0, 1.0}


@FAST
@given(shape=st.tuples(st.integers(1, 5), st.integers(2, 12)), seed=st.integers(0, 2**16),
       mapping=st.sampled_from(["binary", "kmeans", "ternary"]), per_channel=st.booleans())
def test_ste_codebook_gradient_is_range_indicator(shape, seed, mapping, per_channel):
    x = gaussian(shape, seed)
    gran = PerChannel(0) if per_channel else PerTensor()
    bits = {"binary": 1, "ternary": 2, "kmeans": 2}[mapping]
    spec = QuantSpec(bits=bits, mapping=mapping, granularity=gran)
    qp = compute_qparams(x, spec)
    lv = qp.levels
    if lv.dim() == 1:
        lo_b, hi_b = lv[0] * qp.scale, lv[-1] * qp.scale
    else:
        lo_b, hi_b = lv[:, 0].reshape(qp.scale.shape) * qp.scale, lv[:, -1].reshape(qp.scale.shape) * qp.scale
    lo, hi = expand_param(lo_b, x.shape, gran), expand_param(hi_b, x.shape, gran)
    inside = ((x >= lo) & (x <= hi)).float()
    xg = x.clone().requires_grad_(True)
    fake_quantize(xg, spec).sum().backward()
    torch.testing.assert_close(xg.grad, inside, rtol=0, atol=0)
    if mapping == "binary":
        # alpha = mean|x| < max|x| unless all |x| are equal: the largest element is clipped.
        big = x.abs() == expand_param(x.abs().amax(1) if per_channel else x.abs().amax().reshape(1), x.shape, gran)
        mean = expand_param(x.abs().mean(1) if per_channel else x.abs().mean().reshape(1), x.shape, gran)
        assert bool((xg.grad[big & (x.abs() > mean * (1 + 1e-5))] == 0).all())


# ----------------------------------------------------------------------------- k-means
@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 6),
    rows=st.integers(1, 6),
    cols=st.integers(8, 80),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
    sigma=st.floats(1e-3, 1e3),
)
def test_kmeans_never_worse_than_uniform(bits, rows, cols, per_channel, seed, sigma):
    x = gaussian((rows, cols), seed) * sigma
    gran = PerChannel(0) if per_channel else PerTensor()
    km = QuantSpec(bits=bits, mapping="kmeans", granularity=gran)
    un = QuantSpec(bits=bits, symmetric=False, granularity=gran)
    err_km = mse(x, dequantize(quantize(x, km)))
    err_un = mse(x, dequantize(quantize(x, un)))
    assert err_km <= err_un * (1 + 1e-5) + 1e-12 * sigma**2, (err_km, err_un)


@FEW
@given(seed=st.integers(0, 2**16), gran=st.sampled_from([PerTensor(), PerChannel(0), PerGroup(16), PerGroup(24)]))
def test_kmeans_w4_at_most_16_values_per_block(seed, gran):
    # The kmeans-w4 preset's weight spec, plus per-channel / per-group variants.
    x = gaussian((6, 40), seed)
    spec = QuantSpec(bits=4, mapping="kmeans", granularity=gran)
    qt = quantize(x, spec)
    x_hat = dequantize(qt)
    assert int(qt.codes.long().max()) < 16
    if isinstance(gran, PerTensor):
        blocks = [x_hat.flatten()]
    elif isinstance(gran, PerChannel):
        blocks = list(x_hat)
    else:
        blocks = [row[i : i + gran.size] for row in x_hat for i in range(0, 40, gran.size)]
    for blk in blocks:
        assert torch.unique(blk).numel() <= 16
    # Every reconstruction is the nearest centroid of its block (Lloyd fixed point of assignment).
    if isinstance(gran, PerTensor):
        cents = qt.qparams.levels.reshape(-1)
        dist = (x.reshape(-1, 1) - cents.reshape(1, -1)).abs()
        best = dist.min(1).values
        got = (x.reshape(-1) - x_hat.reshape(-1)).abs()
        torch.testing.assert_close(got, best, rtol=1e-6, atol=1e-7)


def test_kmeans_recovers_exact_clusters():
    # 4 well separated values, 2 bits -> 4 centroids: reconstruction is exact.
    x = torch.tensor([-3.0, -3.0, -1.0, 0.5, 0.5, 2.0, -1.0, 2.0, 0.5])
    qt = quantize(x, QuantSpec(bits=2, mapping="kmeans", granularity=PerTensor()))
    torch.testing.assert_close(dequantize(qt), x)


# ----------------------------------------------------------------------------- log2 / exp
@FAST
@given(bits=st.integers(2, 6), shape=st.tuples(st.integers(1, 4), st.integers(1, 16)),
       seed=st.integers(0, 2**16), per_channel=st.booleans())
def test_log2_levels_are_powers_of_two_times_scale(bits, shape, seed, per_channel):
    x = gaussian(shape, seed)
    gran = PerChannel(0) if per_channel else PerTensor()
    spec = QuantSpec(bits=bits, mapping="log2", granularity=gran)
    qt = quantize(x, spec)
    n = 2 ** (bits - 1) - 1
    mags = [2.0**-k for k in range(n)]
    expected_levels = torch.tensor(sorted([-m for m in mags] + [0.0] + mags))
    assert torch.equal(qt.qparams.levels, expected_levels)
    absmax = x.abs().amax(1) if per_channel else x.abs().amax().reshape(1)
    torch.testing.assert_close(qt.qparams.scale.reshape(-1), absmax)
    scale = expand_param(qt.qparams.scale, x.shape, gran)
    lvl = expected_levels[qt.codes.long()]
    assert torch.equal(dequantize(qt), lvl * scale)
    nz = lvl != 0
    exps = torch.log2(lvl[nz].abs())
    assert torch.equal(exps, exps.round()), "every non-zero level must be +-2^-k"
    # the largest element of each block maps to +-scale exactly (level 2^0)
    top = x.abs() == expand_param(absmax, x.shape, gran)
    torch.testing.assert_close(dequantize(qt)[top].abs(), scale[top])
    # nearest level in the linear domain
    dist = (x.reshape(-1, 1) / scale.reshape(-1, 1) - expected_levels.reshape(1, -1)).abs().min(1).values
    got = (x / scale - lvl).abs().reshape(-1)
    torch.testing.assert_close(got, dist, rtol=1e-5, atol=1e-6)


@FAST
@given(bits=st.integers(2, 6), base=st.floats(1.05, 5.0), seed=st.integers(0, 2**16))
def test_exp_with_fixed_base_uses_that_base(bits, base, seed):
    x = gaussian((3, 10), seed)
    spec = QuantSpec(bits=bits, mapping="exp", base=base, granularity=PerChannel(0))
    qt = quantize(x, spec)
    n = 2 ** (bits - 1) - 1
    mags = torch.tensor(base, dtype=torch.float64) ** -torch.arange(n, dtype=torch.float64)
    expected = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]).sort().values.float()
    torch.testing.assert_close(qt.qparams.levels, expected, rtol=1e-6, atol=0)
    lv = qt.qparams.levels
    pos = lv[lv > 0].double()
    if pos.numel() > 1:
        ratios = pos[1:] / pos[:-1]
        torch.testing.assert_close(ratios, torch.full_like(ratios, base), rtol=1e-5, atol=0)
    torch.testing.assert_close(qt.qparams.scale, x.abs().amax(1))


@FEW
@given(bits=st.integers(2, 5), seed=st.integers(0, 2**16), idx=st.integers(0, 39))
def test_exp_fitted_base_is_best_on_grid(bits, seed, idx):
    """The fitted base minimizes the squared error over the grid: no grid base does better."""
    x = gaussian((4, 16), seed) ** 3
    fitted = QuantSpec(bits=bits, mapping="exp", granularity=PerChannel(0))
    fixed = QuantSpec(bits=bits, mapping="exp", base=float(L.EXP_BASE_GRID[idx]), granularity=PerChannel(0))
    sse_fit = ((dequantize(quantize(x, fitted)) - x).double() ** 2).sum()
    sse_fix = ((dequantize(quantize(x, fixed)) - x).double() ** 2).sum()
    assert sse_fit <= sse_fix * (1 + 1e-6) + 1e-12


# ----------------------------------------------------------------------------- binary / ternary
@FAST
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 12)), seed=st.integers(0, 2**16), axis=st.sampled_from([0, 1]))
def test_binary_is_sign_times_channel_mean_abs(shape, seed, axis):
    x = gaussian(shape, seed)
    x = torch.where(x == 0, torch.ones_like(x), x)
    spec = QuantSpec(bits=1, mapping="binary", granularity=PerChannel(axis))
    alpha = x.double().abs().mean(dim=1 - axis, keepdim=True)
    expected = torch.sign(x.double()) * alpha
    torch.testing.assert_close(dequantize(quantize(x, spec)).double(), expected, rtol=1e-6, atol=1e-7)


def test_binary_hand_example():
    x = torch.tensor([[1.0, -3.0], [0.5, 0.25]])
    spec = QuantSpec(bits=1, mapping="binary", granularity=PerChannel(0))
    torch.testing.assert_close(dequantize(quantize(x, spec)), torch.tensor([[2.0, -2.0], [0.375, 0.375]]))


def _ternary_reference(x: torch.Tensor) -> torch.Tensor:
    """TWN per row, in float64: delta = 0.7 mean|x|; alpha = mean{|x| : |x| > delta}."""
    a = x.double().abs()
    delta = 0.7 * a.mean(1, keepdim=True)
    big = a > delta
    alpha = (a * big).sum(1, keepdim=True) / big.sum(1, keepdim=True).clamp_min(1)
    return torch.sign(x.double()) * big * alpha


@FAST
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 12)), seed=st.integers(0, 2**16))
def test_ternary_threshold_and_alpha(shape, seed):
    x = gaussian(shape, seed)
    a = x.double().abs()
    delta = 0.7 * a.mean(1, keepdim=True)
    # keep clear of the threshold so float32 / float64 rounding cannot flip a decision
    assume(bool(((a - delta).abs() > 1e-5 * (1 + delta)).all()))
    spec = QuantSpec(bits=2, mapping="ternary", granularity=PerChannel(0))
    x_hat = dequantize(quantize(x, spec))
    assert bool((x_hat[a <= delta] == 0).all())
    torch.testing.assert_close(x_hat.double(), _ternary_reference(x), rtol=1e-6, atol=1e-7)
    for r in range(shape[0]):
        assert torch.unique(x_hat[r].abs()).numel() <= 2  # {0, alpha_r}


def test_ternary_hand_example():
    # mean|x| = 6.3 / 5 = 1.26 -> delta = 0.882; kept {1, 2, 3} -> alpha = 2
    x = torch.tensor([[1.0, -2.0, 0.1, 3.0, -0.2]])
    spec = QuantSpec(bits=2, mapping="ternary", granularity=PerTensor())
    torch.testing.assert_close(dequantize(quantize(x, spec)), torch.tensor([[2.0, -2.0, 0.0, 2.0, 0.0]]))


# ----------------------------------------------------------------------------- metrics
def test_metrics_hand_examples():
    x = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([1.0, 2.0, 5.0])
    assert mse(x, y) == pytest.approx(4 / 3)
    assert sqnr_db(x, y) == pytest.approx(10 * math.log10(14 / 4))
    assert cosine(x, y) == pytest.approx(20 / math.sqrt(14 * 30))
    assert mse(x, x) == 0.0
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(torch.zeros(3), y) == -math.inf
    assert cosine(x, 3 * x) == pytest.approx(1.0)
    assert cosine(x, -x) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(torch.zeros(3), torch.zeros(3)) == 1.0
    assert cosine(x, torch.zeros(3)) == 0.0
    # 2-D inputs are flattened
    x2 = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    y2 = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    stats = ErrorStats.between(x2, y2)
    assert stats.mse == pytest.approx(0.25)
    assert stats.sqnr_db == pytest.approx(10 * math.log10(25.0))
    assert stats.cosine == pytest.approx(25 / (5 * math.sqrt(26)))
    assert stats.to_dict() == {"mse": stats.mse, "sqnr_db": stats.sqnr_db, "cosine": stats.cosine}


@FAST
@given(
    n1=st.integers(1, 30),
    n2=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    noise=st.floats(0.0, 2.0),
)
def test_error_accumulator_matches_concatenation(n1, n2, seed, noise):
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(n1, 3, generator=gen), torch.randn(n2, 3, generator=gen)
    y1 = x1 + noise * torch.randn(n1, 3, generator=gen)
    y2 = x2 + noise * torch.randn(n2, 3, generator=gen)
    acc = ErrorAccumulator()
    acc.update(x1, y1)
    acc.update(x2, y2)
    got = acc.stats()
    ref = ErrorStats.between(torch.cat([x1, x2]), torch.cat([y1, y2]))
    # the accumulator takes float32 dot products per batch (it runs on every calibration output)
    assert got.mse == pytest.approx(ref.mse, rel=1e-5, abs=1e-12)
    assert got.sqnr_db == pytest.approx(ref.sqnr_db, rel=1e-5, abs=1e-6)
    assert got.cosine == pytest.approx(ref.cosine, rel=1e-6, abs=1e-6)
    blocks = ErrorStats.over_blocks([(x1, y1), (x2, y2)])
    assert blocks.mse == pytest.approx(ref.mse, rel=1e-12, abs=1e-15)
    assert blocks.cosine == pytest.approx(ref.cosine, rel=1e-12)


def test_error_accumulator_empty_raises():
    with pytest.raises(ValueError):
        ErrorAccumulator().stats()


@pytest.mark.parametrize(
    "x, y",
    [
        (torch.ones(4), torch.zeros(4)),  # everything quantized to zero
        (torch.zeros(4), torch.ones(4)),
        (torch.zeros(4), torch.zeros(4)),
    ],
    ids=["approx-zero", "ref-zero", "both-zero"],
)
def test_error_accumulator_degenerate_cosine_matches_stats(x, y):
    """A zero vector against a non-zero one must not be reported as a perfect match."""
    acc = ErrorAccumulator()
    acc.update(x[:2], y[:2])
    acc.update(x[2:], y[2:])
    got, ref = acc.stats(), ErrorStats.between(x, y)
    assert got.mse == ref.mse
    assert got.sqnr_db == ref.sqnr_db
    assert got.cosine == ref.cosine


def test_error_metrics_over_several_chunks_match_float64_formulas():
    """Tensors larger than one float64 chunk (2^20 elements) give the whole-tensor formulas."""
    torch.manual_seed(0)
    x = torch.randn(3, 1 << 20) + 0.5
    y = x + 0.01 * torch.randn_like(x)
    a, b = x.double().flatten(), y.double().flatten()
    stats = ErrorStats.between(x, y)
    assert stats.mse == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-9)
    assert stats.sqnr_db == pytest.approx(float(10 * torch.log10((a @ a) / ((a - b) @ (a - b)))), rel=1e-9)
    assert stats.cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)
    with pytest.raises(ValueError, match="elements"):
        mse(x, y[:2])
