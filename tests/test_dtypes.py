"""Low-precision models: `QuantLinear` keeps its packed buffers in the kernels' dtypes through
every cast; activations cross the kernel boundary in float32 and come back in the model's
dtype; a saved model loads and runs in bfloat16/float16 within 1% of its float32 run."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import abqc
from abqc.codegen.vnni import vnni_supported
from abqc.runtime.format import QuantFormat
from abqc.runtime.qlinear import QuantLinear
from frontends.tiny import tiny_model

LOW = (torch.bfloat16, torch.float16)
KERNEL_DTYPES = {"weight_scale": torch.float32, "weight_zero_point": torch.float32,
                 "weight_sum": torch.int32, "group_k": torch.float32, "bias": torch.float32,
                 "outlier_indices": torch.int64, "outlier_values": torch.float32}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _layer(formulation: str, abits: int = 8) -> QuantLinear:
    if formulation == "vnni" and not vnni_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    g = torch.Generator().manual_seed(0)
    n, k = 37, 200
    outliers = torch.sparse_coo_tensor(torch.tensor([[1, 5], [3, 7]]), torch.tensor([0.5, -2.0]),
                                       (n, k)).coalesce()
    return QuantLinear.from_codes(QuantFormat(n, k, 4, abits, 0, False, formulation),
                                  torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                                  torch.rand(n, 1, generator=g) + 0.5, torch.full((n, 1), 7.0),
                                  bias=torch.randn(n, generator=g), outliers=outliers)


def _assert_kernel_dtypes(q: QuantLinear, packed_dtype):
    assert q.weight_packed.dtype == packed_dtype
    for name, dt in KERNEL_DTYPES.items():
        buf = getattr(q, name)
        assert buf is None or buf.dtype == dt, (name, buf.dtype)


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.bfloat16(),
                                  lambda m: m.to(torch.bfloat16), lambda m: m.double(),
                                  lambda m: m.type(torch.float16),
                                  lambda m: m.to(torch.float16).float()],
                         ids=["half", "bfloat16", "to_bf16", "double", "type_fp16", "fp16_and_back"])
def test_casts_leave_the_packed_buffers_bit_for_bit(cast):
    q = _layer("unpack")
    before = {k: v.clone() for k, v in q.named_buffers()}
    packed = q.weight_packed.dtype
    assert cast(q) is q
    _assert_kernel_dtypes(q, packed)
    for k, v in q.named_buffers():  # no lossy round trip through the cast dtype either
        assert torch.equal(v, before[k]), k


def test_devices_still_move_and_modules_built_under_a_low_default_dtype_are_float32():
    q = _layer("unpack")
    packed = q.weight_packed.dtype
    m = copy.deepcopy(q).to("meta", torch.bfloat16)
    assert all(b.is_meta for b in m.buffers())
    _assert_kernel_dtypes(m, packed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what from_pretrained(dtype=bf16) does around init
    try:
        fresh = QuantLinear(q.fmt, bias=True, outliers=2)
    finally:
        torch.set_default_dtype(old)
    _assert_kernel_dtypes(fresh, packed)


@pytest.mark.parametrize("formulation", ["vnni", "unpack"])
@pytest.mark.parametrize("tokens", [1, 5], ids=["decode_fast_path", "general"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_activations_cross_in_float32_and_the_output_has_the_input_dtype(formulation, tokens, dtype):
    """A low-precision input gives exactly the float32 result of the same (rounded) values,
    rounded once at the end: bias and outliers are added in float32 too."""
    q = _layer(formulation).to(dtype)  # the cast is a no-op on the buffers
    x = torch.randn(1, tokens, q.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (1, tokens, q.out_features)
    assert ("_decode_state" in q.__dict__) == (tokens == 1)  # which path ran
    want = q(x.float())
    assert want.dtype == torch.float32
    assert torch.equal(y, want.to(dtype))


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """abits -> (directory, the float32 model loaded from it, the compiled model's own tree)."""
    out = {}
    for abits in (8, 16):
        cm = abqc.compile(tiny_models["llama"], wbits=4, abits=abits)
        d = cm.save(tmp_path_factory.mktemp("dtypes") / f"w4a{abits}")
        out[abits] = d, AutoModelForCausalLM.from_pretrained(d), cm.hf_model
    return out


@pytest.mark.parametrize("how", ["from_pretrained", "to", "method"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("abits", [8, 16], ids=["W4A8", "W4A16"])
def test_a_saved_model_runs_in_low_precision_within_1pct(saved, ids, abits, dtype, how):
    """`method`: ``.bfloat16()`` / ``.half()`` on the compiled model's tree (transformers itself
    refuses ``.half()`` and ``.float()`` on a model from_pretrained loaded quantized; ``.to``
    is the way there)."""
    d, f32, tree = saved[abits]
    if how == "from_pretrained":
        m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    elif how == "to":
        m = copy.deepcopy(f32).to(dtype)
    else:
        m = copy.deepcopy(tree)
        m = m.bfloat16() if dtype == torch.bfloat16 else m.half()
    assert m.model.embed_tokens.weight.dtype == dtype  # the float parts really are low precision
    qs = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert len(qs) == 14
    for q in qs:
        _assert_kernel_dtypes(q, f32.get_submodule(
            next(n for n, x in m.named_modules() if x is q)).weight_packed.dtype)
    ref = f32(ids).logits
    y = m(ids).logits
    assert y.dtype == dtype
    assert _rel(y, ref) < 0.01
    out = m.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids[:, :4])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_compiling_a_low_precision_source(dtype, method):
    """A bf16/fp16 source compiles, runs in its dtype, and quantizes as well as the float32
    source of the same (rounded) weights does."""
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    src = tiny_model("llama").to(dtype)
    f32_src = copy.deepcopy(src).float()
    want = f32_src(ids).logits
    cm = abqc.compile(src, wbits=4, abits=8, method=method, calib=calib)
    ref = abqc.compile(f32_src, wbits=4, abits=8, method=method, calib=calib)
    y = cm(ids).logits
    assert y.dtype == dtype
    torch.testing.assert_close(cm.hf_model(ids).logits, y, rtol=0, atol=0)
    err, err32 = _rel(y, want), _rel(ref(ids).logits, want)
    assert err < 1.1 * err32 + 0.005, (err, err32)
    out = cm.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)
