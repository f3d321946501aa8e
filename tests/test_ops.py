"""The abqc:: custom ops: same numbers as the quantizer, and fake kernels that export."""
import pytest
import torch

from abqc import quantizer as Q
from abqc.ops import OPS


def _args(group_size=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g)
    s, z = Q.compute_qparams(x, 15, False, group_size)
    return x, s, z


@pytest.mark.parametrize("gs", [0, 16])
def test_ops_match_quantizer(gs):
    x, s, z = _args(gs)
    assert torch.equal(OPS.quantize(x, s, z, 15, gs), Q.quantize(x, s, z, 15, gs))
    q = Q.quantize(x, s, z, 15, gs)
    assert torch.equal(OPS.dequantize(q, s, z, gs), Q.dequantize(q, s, z, gs))
    assert torch.equal(OPS.fake_quant(x, s, z, 15, gs), Q.fake_quantize(x, s, z, 15, gs))
    s2, z2 = OPS.choose_qparams(x, 15, False, gs)
    assert torch.equal(s2, s) and torch.equal(z2, z)


@pytest.mark.parametrize("gs", [0, 16])
def test_opcheck_fake_implementations(gs):
    x, s, z = _args(gs)
    q = Q.quantize(x, s, z, 15, gs)
    torch.library.opcheck(OPS.choose_qparams.default, (x, 15, True, gs))
    torch.library.opcheck(OPS.quantize.default, (x, s, z, 15, gs))
    torch.library.opcheck(OPS.dequantize.default, (q, s, z, gs))
    torch.library.opcheck(OPS.fake_quant.default, (x, s, z, 15, gs))


def test_add_outliers_adds_a_sparse_matrix():
    w = torch.randn(6, 9)
    h = torch.zeros(6, 9)
    h[1, 2], h[4, 8], h[0, 0] = 3.0, -1.5, 0.25
    sp = h.to_sparse_coo().coalesce()
    idx, val = sp.indices().clone(), sp.values().clone()
    out = OPS.add_outliers(w, idx, val)
    assert torch.equal(out, w + h)
    torch.library.opcheck(OPS.add_outliers.default, (w, idx, val))
