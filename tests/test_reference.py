"""FakeQuantLinear rounds as the integer kernels do: bit-identical layers, logits and tokens.

The equality is by construction, not a property of one CPU's rounding: the kernels' float64
epilogue is one expression tree (`abqc.codegen.compute.group_term`) with every product
rounded on its own, which FakeQuantLinear evaluates operation for operation in torch. The
model tests name the formulation they check rather than take what this CPU's tuning log or
feature set would pick (``unpack``, where AVX-512 VNNI is absent, sums in float32 and is
not bit-identical).
"""
import re

import pytest
import torch

import abqc
from abqc.codegen.build import build
from abqc.codegen.compute import KernelShape
from abqc.codegen.vnni import vnni_supported
from abqc.runtime import kernels
from abqc.runtime.format import QuantFormat
from abqc.runtime.qlinear import QuantLinear
from abqc.runtime.reference import FakeQuantLinear

INTEGER = ["bitserial", "lut"] + (["vnni"] if vnni_supported() else [])


def _layer(fmt: QuantFormat, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if not fmt.group_size else -(-fmt.k // fmt.group_size)
    qmax = (1 << fmt.wbits) - 1
    codes = torch.randint(0, qmax + 1, (fmt.n, fmt.k), generator=g, dtype=torch.uint8)
    scale = torch.rand(fmt.n, groups, generator=g) * 0.01 + 1e-3
    zero = torch.randint(0, qmax + 1, (fmt.n, groups), generator=g).float()
    bias = torch.randn(fmt.n, generator=g)
    return QuantLinear.from_codes(fmt, codes, scale, zero, bias=bias)


@pytest.mark.parametrize("formulation", INTEGER)
@pytest.mark.parametrize("wbits,abits,group_size,sym", [
    (3, 8, 0, False), (4, 4, 0, True), (2, 1, 0, False), (8, 8, 0, False), (3, 8, 64, False),
    (1, 1, 0, False), (1, 8, 64, False)])
def test_layer_is_bit_identical_to_the_integer_kernels(formulation, wbits, abits, group_size, sym):
    """Also 1-bit asymmetric grids, whose zero points are fractional: there the epilogue's
    sums round (with integer zeros they are exact), identically only if the order is the same."""
    if formulation == "vnni" and group_size:
        pytest.skip("vnni takes per-channel weights")
    fmt = QuantFormat(96, 200, wbits, abits, group_size, sym, formulation)
    q = _layer(fmt)
    if wbits == 1:  # the 1-bit asymmetric grid: min and max, a fractional zero
        q.weight_zero_point.uniform_(-3, 3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(37, 200) * torch.linspace(0.1, 8, 200)  # uneven channels, as in LLMs
    y_kernel, y_ref = q(x), FakeQuantLinear(q)(x)  # M = 37: the prefill (M bucket 128) kernel
    assert torch.equal(y_kernel, y_ref), (y_kernel - y_ref).abs().max()
    assert torch.equal(q(x[:1]), FakeQuantLinear(q)(x[:1]))  # the one-token decode kernel
    assert torch.equal(q(x[:5]), y_ref[:5])  # M bucket 16; a token's result does not depend on M


@pytest.mark.parametrize("formulation,params", [
    ("bitserial", {"order": "k_inner", "n_tile": 16, "m_outer": True}),
    ("lut", {"order": "n_inner", "n_tile": 8, "m_outer": False})]
    + ([("vnni", {"n_tile": 8, "chains": 2}), ("vnni", {"n_tile": 4, "m_tile": 4})]
       if vnni_supported() else []), ids=str)
def test_kernels_contain_no_fused_multiply_add(formulation, params):
    """What makes the equality hold on every CPU: the integer kernels' only float arithmetic
    is the float64 epilogue, and LLVM (which TVM lets contract a multiply into a following
    add) emits no FMA there, so each product rounds on its own, as in torch."""
    ex = build(formulation, KernelShape(37, 200, 1, 8, 64 if formulation != "vnni" else 0), params,
               functions=("main",))
    asm = ex.mod.inspect_source("asm")
    assert re.search(r"\bvmul[sp]d\b", asm)  # the epilogue is there (float64 multiplies)
    assert not re.findall(r"\bvf(?:n)?m(?:add|sub|addsub|subadd)\d{3}[sp][sd]\b", asm)


@pytest.mark.parametrize("abits,group_size", [(8, 64), (16, 0), (16, 64)])
def test_float_accumulating_kernels_agree_to_float32_rounding(abits, group_size):
    """`unpack` (and weight-only) sums in float32, in its own order: close, not identical."""
    fmt = QuantFormat(96, 200, 3, abits, group_size, False, "unpack")
    q = _layer(fmt)
    x = torch.randn(5, 200)
    ref = FakeQuantLinear(q)
    torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)
    if abits == 16:  # the float64 product of x and the dequantized weight, rounded once
        want = (x.double() @ q.dequantized_weight().double().T + q.bias.double()).float()
        torch.testing.assert_close(ref(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("formulation", [INTEGER[-1]])  # vnni where the CPU has it, else lut
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("wbits,abits", [(4, 8), (4, 4), ("2*", 8)])
def test_fake_quant_model_matches_the_kernels_logits_and_greedy_tokens(tiny_models, ids, family,
                                                                         wbits, abits, formulation,
                                                                         monkeypatch):
    # the formulation under test, not whatever this CPU's tuning log would pick (every
    # tiny-model linear is per channel with abits <= 8, so each integer formulation fits)
    monkeypatch.setattr(kernels, "best_formulation", lambda shape, tune_missing=None: formulation)
    cm = abqc.compile(tiny_models[family], wbits=wbits, abits=abits)
    assert {m.fmt.formulation for m in cm.hf_model.modules() if isinstance(m, QuantLinear)} == \
        {formulation}
    ref = cm.fake_quant_model()
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    assert any(isinstance(m, FakeQuantLinear) for m in ref.modules())
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, cm.hf_model(ids).logits)
    prompt = ids[:, :5]
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(prompt, **kw), ref.generate(prompt, **kw))
    # buffers are shared with the kernel tree, not copied
    q = next(m for m in cm.hf_model.modules() if isinstance(m, QuantLinear))
    assert any(m.qlinear is q for m in ref.modules() if isinstance(m, FakeQuantLinear))


def test_fake_quant_model_needs_the_module_tree(tiny_models):
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8, backend="fake_quant")
    with pytest.raises(RuntimeError, match="no transformers model tree"):
        cm.fake_quant_model()
