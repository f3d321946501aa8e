"""The quantizer maths: grids, granularities, symmetric/asymmetric, 1..8 bits."""
import pytest
import torch

from abqc import quantizer as Q
from abqc.config import QuantSpec, sym_zero


def _w(n=16, k=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.linspace(0.1, 3, n).unsqueeze(1)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16, 32])
def test_codes_in_range_and_dequantized_values_on_grid(bits, symmetric, group_size):
    w = _w()
    qmax = (1 << bits) - 1
    scale, zero = Q.compute_qparams(w, qmax, symmetric, group_size)
    groups = 1 if group_size == 0 else -(-w.shape[1] // group_size)
    assert scale.shape == zero.shape == (w.shape[0], groups)
    q = Q.quantize(w, scale, zero, qmax, group_size)
    assert q.dtype == torch.uint8 and int(q.min()) >= 0 and int(q.max()) <= qmax
    deq = Q.dequantize(q, scale, zero, group_size)
    # each value is scale * (integer - zero) for its own row/group's (scale, zero)
    s = Q.expand_qparam(scale, w.shape[1], group_size)
    z = Q.expand_qparam(zero, w.shape[1], group_size)
    level = deq / s + z
    assert torch.allclose(level, level.round(), atol=1e-4)
    assert int(level.round().min()) >= 0 and int(level.round().max()) <= qmax
    # fake_quant is quantize then dequantize
    assert torch.allclose(Q.fake_quantize(w, scale, zero, qmax, group_size), deq, atol=1e-6)
    # each value rounds to a nearest grid point: error at most half a step, inside the range
    lo, hi = s * (0 - z), s * (qmax - z)
    inside = (w >= lo) & (w <= hi)
    assert ((w - deq).abs()[inside] <= s.expand_as(w)[inside] / 2 + 1e-5).all()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 32])
def test_error_shrinks_as_bits_grow(symmetric, group_size):
    w = _w(seed=3)
    errs = []
    for bits in range(1, 9):
        spec = QuantSpec(bits, symmetric, "group" if group_size else "channel", group_size)
        q, s, z = Q.rtn(w, spec)
        errs.append(float((Q.dequantize(q, s, z, group_size) - w).pow(2).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 * errs[0]


def test_groups_beat_channels_and_last_group_is_padded():
    w = _w(k=70)
    err = {}
    for gs in (0, 16):
        s, z = Q.compute_qparams(w, 7, False, gs)
        err[gs] = float((Q.fake_quantize(w, s, z, 7, gs) - w).pow(2).mean())
    assert err[16] < err[0]
    s, z = Q.compute_qparams(w, 7, False, 16)
    # 70 = 4 * 16 + 6: the fifth group holds the last 6 columns only
    tail = w[:, 64:]
    assert torch.allclose(s[:, 4], (tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / 7)


def test_asymmetric_grid_contains_zero_exactly():
    w = _w() + 5.0  # all positive rows: the range is widened to include 0
    s, z = Q.compute_qparams(w, 15, False)
    zero_deq = Q.dequantize(z.round().to(torch.uint8), s, z)
    assert torch.all(zero_deq == 0)


def test_symmetric_grids():
    assert sym_zero(1) == 0.5 and sym_zero(3) == 2 and sym_zero(255) == 128 and sym_zero(4) == 2
    w = _w()
    # binary symmetric grid: two levels +-amax per row
    s, z = Q.compute_qparams(w, 1, True)
    deq = Q.fake_quantize(w, s, z, 1)
    amax = w.abs().amax(1, keepdim=True)
    assert torch.allclose(deq.abs(), amax.expand_as(deq))
    assert torch.equal(torch.sign(deq), torch.sign(w))
    # the 5-level grid (qmax=4) is exactly symmetric: {-2,-1,0,1,2} * amax/2
    s, z = Q.compute_qparams(w, 4, True)
    levels = torch.unique(((Q.fake_quantize(w, s, z, 4) / s)).round())
    assert set(levels.tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0} and len(levels) == 5


def test_per_token_activation_qparams():
    x = torch.randn(2, 7, 33)
    s, z = Q.compute_qparams(x, 255, False)
    assert s.shape == (2, 7, 1)
    xq = Q.fake_quantize(x, s, z, 255)
    assert (xq - x).abs().max() <= s.max() / 2 + 1e-6
    # each token's own range: scaling one token does not change another's qparams
    x2 = x.clone()
    x2[0, 0] *= 100
    s2, _ = Q.compute_qparams(x2, 255, False)
    assert torch.equal(s2[1], s[1]) and s2[0, 0] > 50 * s[0, 0]


def test_constant_rows_do_not_divide_by_zero():
    w = torch.zeros(4, 8)
    for sym in (False, True):
        s, z = Q.compute_qparams(w, 15, sym)
        assert torch.isfinite(s).all() and torch.equal(Q.fake_quantize(w, s, z, 15), w)


def test_quant_spec_validation():
    with pytest.raises(ValueError, match="bits=9"):
        QuantSpec(9)
    with pytest.raises(ValueError, match="granularity='row'"):
        QuantSpec(4, granularity="row")
    with pytest.raises(ValueError, match="group_size=0"):
        QuantSpec(4, granularity="group", group_size=0)
