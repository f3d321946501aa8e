"""The AVX-512 VNNI kernels: exact integer accumulators for every WxAy, the fused
activation-code kernel equal to the fake-quant grid, the float epilogue, the layout."""
import itertools

import pytest
import torch

from abqc.codegen.actquant import actcodes_kernel
from abqc.codegen.build import build
from abqc.codegen.compute import KernelShape
from abqc.codegen.kernel import Kernel, _dl, pack_weight, quantize_activations, reference
from abqc.codegen.vnni_gemm import vnni_gemm
from abqc.codegen.vnni import pack_vnni, storage_bits, unpack_vnni, vnni_kp, vnni_supported
from abqc.errors import ConfigError
from abqc.runtime.format import QuantFormat

BITS = range(1, 9)
N, K = 37, 200  # N odd and not a multiple of the row tile, K not a multiple of a block
MS = (1, 3, 17)
needs_vnni = pytest.mark.skipif(not vnni_supported(), reason="this CPU has no AVX-512 VNNI "
                                "(avx512_vnni + avx512bw); the vnni kernels cannot run here")


def _codes(rows, k, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, k), generator=g, dtype=torch.int64).to(torch.uint8)


def test_layout_round_trips_and_pads():
    for wbits in BITS:
        c = _codes(N, K, wbits, wbits)
        p = pack_vnni(c, wbits)
        sb = storage_bits(wbits)
        assert p.dtype == torch.uint8 and p.shape == (48, vnni_kp(K, wbits) * sb // 512, 64)
        assert torch.equal(unpack_vnni(p, wbits, N, K), c)
        assert not p[N:].any()  # padded rows hold nothing
    # 2-bit: byte j of block 0 holds k = j, 64 + j, 128 + j, 192 + j at bits 0, 2, 4, 6
    c = _codes(1, 256, 2, 7)
    b = int(pack_vnni(c, 2)[0, 0, 5])
    assert [(b >> (2 * t)) & 3 for t in range(4)] == [int(c[0, 5 + 64 * t]) for t in range(4)]
    assert int(pack_vnni(torch.full((1, 64), 200, dtype=torch.uint8), 8)[0, 0, 0]) == 200 - 128


@needs_vnni
@pytest.mark.parametrize("params", [{"n_tile": 8}, {"n_tile": 4, "m_tile": 4}, {"n_tile": 8, "m_tile": 2},
                                    {"n_tile": 2, "m_tile": 8}], ids=str)
def test_integer_accumulator_is_exact_for_every_wxay(params):
    """The GEMV kernel and the register-blocked prefill kernels (`m_tile`; M = 1, 3, 17
    leave partial token blocks, N = 37 a partial row block)."""
    for wbits, abits in itertools.product(BITS, BITS):
        shape = KernelShape(n=N, k=K, wbits=wbits, abits=abits)
        kern = Kernel(build("vnni", shape, params, functions=("acc",)), "vnni", shape, params)
        wq = _codes(N, K, wbits, wbits)
        pw = pack_weight(wq, torch.ones(N, 1), torch.zeros(N, 1), shape, "vnni")
        for m in MS:
            xq = _codes(m, K, abits, 100 * abits + m)
            data = torch.nn.functional.pad(xq, (0, vnni_kp(K, wbits) - K))
            acc = kern.accumulate(data, pw, m)
            expect = (xq.long() @ wq.long().T).to(torch.int32)
            assert torch.equal(acc[..., 0], expect), (wbits, abits, m)


@needs_vnni
@pytest.mark.parametrize("abits, symmetric", [(1, False), (4, False), (8, False), (8, True), (3, True)])
def test_activation_codes_kernel_equals_the_fake_quant_grid(abits, symmetric):
    g = torch.Generator().manual_seed(abits)
    x = torch.randn(17, K, generator=g)
    x[:, 3] *= 8
    x[0] = 0.0  # an all-zero token (scale falls back to 1)
    kp = vnni_kp(K, 2)
    codes, sx, zx, sumx = (torch.empty(17, kp, dtype=torch.uint8), torch.empty(17), torch.empty(17),
                           torch.empty(17, 1, dtype=torch.int32))
    actcodes_kernel(K, kp, abits, symmetric)(_dl(x), _dl(codes), _dl(sx), _dl(zx), _dl(sumx))
    want, s, z = quantize_activations(x, abits, symmetric)
    assert torch.equal(codes[:, :K], want) and not codes[:, K:].any()
    assert torch.equal(sx, s) and torch.equal(zx, z)
    assert torch.equal(sumx[:, 0], want.int().sum(1))


@needs_vnni
@pytest.mark.parametrize("wbits, abits, params", [
    (1, 1, {"n_tile": 4}), (2, 8, {"n_tile": 8}), (4, 4, {"n_tile": 16}), (3, 8, {"n_tile": 8}),
    (8, 8, {"n_tile": 4}), (6, 2, {"n_tile": 16}), (4, 8, {"n_tile": 4, "m_tile": 4}),
    (8, 8, {"n_tile": 2, "m_tile": 8}), (2, 3, {"n_tile": 8, "m_tile": 2})])
def test_float_output_matches_fake_quant(wbits, abits, params):
    g = torch.Generator().manual_seed(wbits * 10 + abits)
    shape = KernelShape(n=N, k=K, wbits=wbits, abits=abits)
    codes = _codes(N, K, wbits, abits)
    scale = torch.rand(N, 1, generator=g) + 0.1
    zero = torch.randint(0, 1 << wbits, (N, 1), generator=g).float()
    x = torch.randn(5, K, generator=g)
    kern = Kernel(build("vnni", shape, params), "vnni", shape, params)
    y = kern(x, pack_weight(codes, scale, zero, shape, "vnni"))
    ref = reference(x, codes, scale, zero, shape)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_register_block_is_checked():
    """A block that would spill its accumulators, or a row tile that splits the padding, is refused."""
    shape = KernelShape(n=N, k=K, wbits=4, abits=8)
    with pytest.raises(ValueError, match="8 x 6 block needs 62 vector registers"):
        vnni_gemm(shape, n_tile=8, m_tile=6)
    with pytest.raises(ValueError, match="n_tile=3 must divide 16"):
        vnni_gemm(shape, n_tile=3, m_tile=2)


def test_vnni_format_refuses_groups_and_float_activations():
    with pytest.raises(ConfigError, match="per-channel"):
        QuantFormat(64, 128, 4, 8, 64, False, "vnni")
    with pytest.raises(ConfigError, match="does not fit abits=16"):
        QuantFormat(64, 128, 4, 16, 0, False, "vnni")
