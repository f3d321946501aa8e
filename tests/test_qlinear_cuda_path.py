"""`QuantLinear` on a CUDA device, checked without a GPU.

The CUDA branch (`forward_cuda`) is run on CPU tensors with `kernel_for` replaced by the
b1 kernel's LLVM emulation (the same TensorIR index arithmetic and fragment semantics as
the GPU kernel; see `template`), and compared with the CPU kernels' `qlinear_impl`.
"""
import pytest
import torch
import tvm

from abqc.codegen.cuda import runtime as cuda_rt
from abqc.codegen.cuda import space as S
from abqc.codegen.cuda.kernel import CudaKernel
from abqc.codegen.cuda.template import build_func
from abqc.quantizer import compute_qparams, quantize
from abqc.runtime.format import QuantFormat
from abqc.runtime.qlinear import QuantLinear, qlinear_impl

_ORDER = ("X", "W", "sx", "zx", "sumx", "sw", "zw", "sumw", "kg", "y")


class EmulatedKernel(CudaKernel):
    """A `CudaKernel` whose launches run the LLVM emulation of the same schedule."""

    def __init__(self, problem, sched):
        self.problem, self.sched, self.arch = problem, sched, "sm_80"
        self.kw, self.np_ = S.kw_words(problem, sched), S.n_padded(problem, sched)
        mod = tvm.compile(tvm.IRModule({"main": build_func(problem, sched, True, emulate=True)}),
                          target={"kind": "llvm"})
        self.fns = {"main": mod["main"]}
        self.launched = 0

    def launch(self, name, m, **args):
        self.launched += 1
        self.fns[name](*[tvm.runtime.from_dlpack(args[a].contiguous()) for a in _ORDER])


def _layer(fmt, seed=0, bias=True, outliers=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(fmt.n, fmt.k, generator=g)
    qmax = (1 << fmt.wbits) - 1
    s, z = compute_qparams(w, qmax, False, fmt.group_size)
    if fmt.group_size:
        codes = quantize(w.view(fmt.n, -1, fmt.group_size), s.unsqueeze(-1), z.unsqueeze(-1), qmax)
        codes = codes.reshape(fmt.n, fmt.k).to(torch.uint8)
    else:
        codes = quantize(w, s, z, qmax).to(torch.uint8)
    h = None
    if outliers:
        idx = torch.stack([torch.randint(0, fmt.n, (outliers,), generator=g),
                           torch.randperm(fmt.k, generator=g)[:outliers]])
        h = torch.sparse_coo_tensor(idx, torch.randn(outliers, generator=g), (fmt.n, fmt.k),
                                    check_invariants=True).coalesce()
    b = torch.randn(fmt.n, generator=g) if bias else None
    return QuantLinear.from_codes(fmt, codes, s, z, bias=b, outliers=h), codes


def _cpu(mod, x):
    return qlinear_impl(x, mod.weight_packed, mod.weight_scale, mod.weight_zero_point, mod.weight_sum,
                        mod.group_k, mod.bias, mod.outlier_indices, mod.outlier_values, mod.spec)


@pytest.mark.parametrize("formulation", ["unpack", "bitserial", "lut", "wo_bitserial", "wo_lut"])
def test_codes_unpack_from_every_layout(formulation):
    wo = formulation.startswith("wo_") or formulation == "unpack"
    fmt = QuantFormat(n=13, k=150, wbits=3, abits=16 if formulation.startswith("wo_") else 6,
                      formulation=formulation)
    assert wo or fmt.abits == 6
    mod, codes = _layer(fmt, bias=False)
    assert torch.equal(mod.codes(), codes)


@pytest.mark.parametrize("m", [1, 5, 13])
def test_cuda_branch_with_emulated_kernel_matches_cpu_kernels(monkeypatch, m):
    fmt = QuantFormat(n=40, k=300, wbits=3, abits=5)
    mod, _ = _layer(fmt, seed=m, outliers=7)
    made = []

    def fake_kernel_for(shape, mm, device="cpu", *a, **k):
        assert (shape.n, shape.k, shape.wbits, shape.abits) == (40, 300, 3, 5)
        p = cuda_rt.problem_for(shape, mm)
        sched = S.default(p, "sm_80", mm)
        made.append(EmulatedKernel(p, sched))
        return made[-1]
    monkeypatch.setattr(cuda_rt, "kernel_for", fake_kernel_for)
    x = torch.randn(1, m, fmt.k, generator=torch.Generator().manual_seed(1))
    x[..., 7] *= 15  # an outlier channel
    y = mod.forward_cuda(x)
    ref = _cpu(mod, x)
    assert y.shape == ref.shape == (1, m, fmt.n)
    assert made and made[0].launched == 1
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    y2 = mod.forward_cuda(x)  # looked up once per token-count bucket
    assert torch.equal(y, y2) and len(made) == 1  # kernel and packed weight reused


@pytest.mark.parametrize("fmt", [QuantFormat(n=24, k=256, wbits=4, abits=16),
                                 QuantFormat(n=24, k=256, wbits=4, abits=8, group_size=64)],
                         ids=["weight_only", "grouped"])
def test_cuda_branch_without_b1_kernel_is_the_same_function(monkeypatch, fmt):
    """Formats the b1 kernels do not cover run as a float matmul on the dequantized weight."""
    monkeypatch.setattr(cuda_rt, "kernel_for", lambda *a, **k: pytest.fail("no b1 kernel expected"))
    mod, _ = _layer(fmt, seed=3)
    x = torch.randn(9, fmt.k, generator=torch.Generator().manual_seed(2))
    ref = _cpu(mod, x)
    assert torch.allclose(mod.forward_cuda(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
