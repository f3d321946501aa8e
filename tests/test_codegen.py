"""CPU kernels: exact integer accumulators for every WxAy and both formulations, float
outputs against the fake-quant reference, weight-only kernels, awkward shapes."""
import itertools

import pytest
import torch

from abqc.codegen import packing as P
from abqc.codegen.build import build
from abqc.codegen.compute import KernelShape
from abqc.codegen.kernel import Kernel, pack_weight, quantize_activations, reference
from abqc.quantizer import compute_qparams, quantize

BITS = range(1, 9)
N, K = 13, 200  # N odd, K not a multiple of 64
MS = (1, 3, 17)


def _codes(rows, k, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, k), generator=g, dtype=torch.int64).to(torch.uint8)


def test_packing_round_trips_and_pads_with_zeros():
    c = _codes(5, 100, 5, 0)
    planes = P.pack_bitplanes(c, 5)
    assert planes.shape == (5, 5, 2) and planes.dtype == torch.int64
    assert torch.equal(P.unpack_bitplanes(planes, 100), c.int())
    assert torch.equal(P.unpack_bitplanes(planes, 128)[:, 100:], torch.zeros(5, 28, dtype=torch.int32))
    nib = P.pack_nibbles(c, 5)
    assert nib.shape == (5, 5, 32) and int(nib.max()) < 16
    t = P.lookup_tables(c, 128)
    sub = c[:, 4:8].int()  # group 1; entry 0b1011 = elements 0, 1, 3
    assert int(t[2, 1, 0b1011]) == int(sub[2, 0] + sub[2, 1] + sub[2, 3])
    with pytest.raises(ValueError, match="group_size=96"):
        P.padded_k(100, 96)


@pytest.mark.parametrize("formulation", ["bitserial", "lut"])
def test_integer_accumulator_is_exact_for_every_wxay(formulation):
    order = {"bitserial": "bits_inner", "lut": "n_inner"}[formulation]
    for wbits, abits in itertools.product(BITS, BITS):
        shape = KernelShape(n=N, k=K, wbits=wbits, abits=abits)
        kern = Kernel(build(formulation, shape, {"n_tile": 4, "order": order}, functions=("acc",)),
                      formulation, shape, {})
        wq = _codes(N, K, wbits, wbits)
        pw = pack_weight(wq, torch.ones(N, 1), torch.zeros(N, 1), shape, formulation)
        for m in MS:
            xq = _codes(m, K, abits, 100 * abits + m)
            data = P.pack_bitplanes(xq, abits) if formulation == "bitserial" else P.lookup_tables(xq, shape.kp)
            acc = kern.accumulate(data, pw, m)
            expect = (xq.long() @ wq.long().T).to(torch.int32)  # integer reference
            assert torch.equal(acc[..., 0], expect), (formulation, wbits, abits, m)


def _float_case(shape, seed, act_symmetric=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape.n, shape.k, generator=g)
    x = torch.randn(17, shape.k, generator=g)
    x[:, 3] *= 8  # an outlier channel
    qmax = (1 << shape.wbits) - 1
    s, z = compute_qparams(w, qmax, False, shape.group_size)
    return x, quantize(w, s, z, qmax, shape.group_size), s, z


@pytest.mark.parametrize("formulation", ["bitserial", "lut"])
@pytest.mark.parametrize("wbits, abits, group_size", [(1, 1, 0), (2, 8, 0), (4, 4, 64), (3, 8, 128),
                                                      (8, 8, 0), (6, 6, 64), (2, 3, 0)])
def test_float_output_matches_fake_quant(formulation, wbits, abits, group_size):
    shape = KernelShape(n=N, k=K, wbits=wbits, abits=abits, group_size=group_size)
    x, codes, s, z = _float_case(shape, wbits * 10 + abits)
    order = "k_inner" if formulation == "bitserial" else "n_inner"
    kern = Kernel(build(formulation, shape, {"n_tile": 8, "order": order, "m_outer": False},
                        functions=("main",)), formulation, shape, {})
    pw = pack_weight(codes, s, z, shape, formulation)
    for act_symmetric in (False, True):
        y = kern(x, pw, act_symmetric=act_symmetric)
        ref = reference(x, codes, s, z, shape, act_symmetric=act_symmetric)
        rel = (y.double() - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, (formulation, wbits, abits, group_size, act_symmetric, float(rel))


@pytest.mark.parametrize("formulation", ["wo_bitserial", "wo_lut"])
@pytest.mark.parametrize("group_size", [0, 64])
def test_weight_only_kernels_match_dequantized_weights(formulation, group_size):
    for wbits in BITS:
        shape = KernelShape(n=N, k=K, wbits=wbits, abits=16, group_size=group_size)
        x, codes, s, z = _float_case(shape, wbits)
        kern = Kernel(build(formulation, shape, {"n_tile": 4, "order": "k_inner"}, functions=("main",)),
                      formulation, shape, {})
        y = kern(x, pack_weight(codes, s, z, shape, formulation))
        ref = reference(x, codes, s, z, shape)
        assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-4, (formulation, wbits)


def test_unpack_codes_round_trip_for_every_width():
    from abqc.codegen.unpack import code_words, codes_per_word, pack_codes

    for bits in BITS:
        c = _codes(7, 200, bits, bits)
        packed = pack_codes(c, bits, 256)
        per = codes_per_word(bits)
        assert packed.shape == (code_words(256, bits), 7) and packed.dtype == torch.int32
        words = packed.T.long() & 0xFFFFFFFF
        got = torch.stack([(words[:, k // per] >> (k % per) * bits) & ((1 << bits) - 1)
                           for k in range(256)], 1)
        assert torch.equal(got[:, :200], c.long()) and not got[:, 200:].any()


@pytest.mark.parametrize("params", [{"n_tile": 8, "m_tile": 1, "decode": "inline"},
                                    {"n_tile": 4, "m_tile": 3, "decode": "panel", "k_unroll": 2}])
def test_unpack_matches_fake_quant_for_every_width(params):
    """The float-accumulating formulation: every WxAy (and WxA16), groups, M not a multiple
    of the register block; integer accumulator exact where float32 holds it exactly."""
    for wbits in BITS:
        for abits, group_size in ((16, 0), (wbits % 8 + 1, 64), (8, 0)):
            shape = KernelShape(n=N, k=K, wbits=wbits, abits=abits, group_size=group_size)
            x, codes, s, z = _float_case(shape, wbits * 10 + abits)
            kern = Kernel(build("unpack", shape, params), "unpack", shape, params)
            pw = pack_weight(codes, s, z, shape, "unpack")
            for m in MS:
                y = kern(x[:m], pw)
                ref = reference(x[:m], codes, s, z, shape)
                assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-4, (wbits, abits, m)
            xq = _codes(5, K, 4, wbits).float()
            acc = kern.accumulate(kern.activation_inputs(xq, False)[0] if abits == 16 else
                                  torch.nn.functional.pad(xq, (0, shape.kp - K, 0, 1)), pw, 5)
            assert torch.equal(acc.sum(-1), (xq.double() @ codes.double().T).float())


def test_bit_balance_grid_stored_as_three_bits():
    """The 5-level 2* grid (codes 0..4, symmetric zero 2) runs on 3-bit weight kernels."""
    shape = KernelShape(n=N, k=K, wbits=3, abits=16)
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(N, K, generator=g), torch.randn(5, K, generator=g)
    s, z = compute_qparams(w, 4, True)
    codes = quantize(w, s, z, 4)
    assert int(codes.max()) <= 4 and torch.all(z == 2)
    for form in ("wo_bitserial", "wo_lut", "unpack"):
        kern = Kernel(build(form, shape, {"n_tile": 4, "order": "k_inner"}, functions=("main",)), form, shape, {})
        y = kern(x, pack_weight(codes, s, z, shape, form))
        ref = reference(x, codes, s, z, shape)
        assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_bad_inputs_are_refused():
    shape = KernelShape(n=N, k=K, wbits=2, abits=2)
    with pytest.raises(ValueError, match="beyond 2-bit"):
        pack_weight(_codes(N, K, 3, 0) | 4, torch.ones(N, 1), torch.zeros(N, 1), shape, "bitserial")
    with pytest.raises(ValueError, match="do not match"):
        pack_weight(_codes(N, 10, 2, 0), torch.ones(N, 1), torch.zeros(N, 1), shape, "bitserial")
    with pytest.raises(ValueError, match="formulation='simd'"):
        build("simd", shape, {"n_tile": 4, "order": "k_inner"})
    c, s, z = quantize_activations(torch.randn(2, K), 4)
    assert c.dtype == torch.uint8 and s.shape == z.shape == (2,)
