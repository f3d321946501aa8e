"""The decode engine (`abqc.runtime.decode`): the step generation runs, on every path.

Before: ``cm.generate`` ran transformers' eager tree (DynamicCache, ~30 µs of Python per
packed linear). The lowering: `DecodeEngine` reads the tree's own tensors into a static KV
cache and straight-line layers. After: the same logits and tokens, through generate,
sampling, streaming, batches, a saved + reloaded model and ``from_pretrained``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import abqc
from abqc.runtime.decode import DecodeEngine, StepLinear, engine_unsupported
from abqc.runtime.decode.engine import CACHE_STEP
from abqc.runtime.decode.generate import generate

GREEDY = dict(do_sample=False, pad_token_id=259)  # an id no prompt here holds
#: the engine calls the same kernels and float ops as the tree; only SDPA reads the cache
#: through a view of a longer buffer, so logits are compared to float32 rounding of that
ATOL = 1e-5


@pytest.fixture(scope="module")
def compiled(tiny_models):
    return {f: abqc.compile(tiny_models[f], wbits=4, abits=8) for f in ("llama", "qwen2", "mistral")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_engine_logits_match_the_tree_prefill_decode_and_chunks(compiled, family, ids):
    tree = compiled[family].hf_model
    eng = DecodeEngine(tree)
    eng.reset(2)
    with torch.no_grad():
        ref = tree(ids[:, :10], use_cache=True)
        got = eng.step(ids[:, :10], all_logits=True)
        assert got.shape == ref.logits.shape
        torch.testing.assert_close(got, ref.logits, atol=ATOL, rtol=0)
        cache = ref.cache if hasattr(ref, "cache") and ref.cache is not None else ref.past_key_values
        for t in range(10, 14):  # one token at a time
            r = tree(ids[:, t:t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(eng.step(ids[:, t:t + 1]), r.logits, atol=ATOL, rtol=0)
        r = tree(ids[:, 14:20], cache=cache, use_cache=True)  # a chunk after the cache
        torch.testing.assert_close(eng.step(ids[:, 14:20], all_logits=True), r.logits, atol=ATOL, rtol=0)
    assert eng.position == 20


def test_single_token_fast_path_is_the_modules_kernel(compiled, ids):
    """`StepLinear`'s one-token path calls the same two kernels as the module: equal bits."""
    tree = compiled["llama"].hf_model
    mod = tree.model.layers[0].mlp.down_proj
    step = StepLinear(mod)
    assert step._one is not None, "a per-channel W4A8 linear takes the fast path"
    x = torch.randn(1, mod.in_features)
    assert torch.equal(step(x), mod(x))
    x2 = torch.randn(3, mod.in_features)  # several tokens: the module itself
    assert torch.equal(step(x2), mod(x2))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_greedy_tokens_equal_tree_and_fake_quant(compiled, family, ids):
    cm = compiled[family]
    prompt = ids[:1, :6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine runs: no fallback warning
        fast = cm.generate(prompt, max_new_tokens=16, **GREEDY)
    assert torch.equal(fast, cm.generate(prompt, max_new_tokens=16, engine=False, **GREEDY))
    assert torch.equal(fast, cm.fake_quant_model().generate(prompt, max_new_tokens=16, **GREEDY))
    assert fast.shape == (1, 22)


def test_sampling_streaming_stop_and_batch(compiled, ids):
    cm = compiled["llama"]
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20, temperature=0.9, pad_token_id=259)
    torch.manual_seed(3)
    a = cm.generate(ids[:, :5], **kw)
    torch.manual_seed(3)
    b = cm.generate(ids[:, :5], engine=False, **kw)
    assert torch.equal(a, b) and a.shape == (2, 17)

    class Collect:
        def __init__(self):
            self.parts = []

        def put(self, value):
            self.parts.append(value.reshape(-1).clone())

        def end(self):
            self.parts.append(None)

    s = Collect()
    out = cm.generate(ids[:1, :5], max_new_tokens=6, streamer=s, **GREEDY)
    assert s.parts[-1] is None
    assert torch.equal(torch.cat(s.parts[:-1]), out[0])
    eos = int(out[0, 7])  # stop at the third generated token
    stopped = cm.generate(ids[:1, :5], max_new_tokens=6, eos_token_id=eos, **GREEDY)
    assert stopped.shape[1] <= 8 and int(stopped[0, -1]) == eos


def test_cache_grows_past_its_first_allocation(compiled, ids):
    cm = compiled["llama"]
    prompt = torch.randint(0, 256, (1, CACHE_STEP - 3), generator=torch.Generator().manual_seed(5))
    out = cm.generate(prompt, max_new_tokens=8, **GREEDY)
    eng = cm.hf_model.__dict__["_abqc_engine"].engine
    eng.reset(1, capacity=4)  # too small on purpose: step must grow it
    with torch.no_grad():
        eng.step(prompt)
        assert eng.capacity >= prompt.shape[1]
    assert torch.equal(out, cm.generate(prompt, max_new_tokens=8, engine=False, **GREEDY))


def test_fallbacks_warn_with_the_reason_and_still_generate(compiled, tiny_models, ids):
    cm = compiled["llama"]
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    with pytest.warns(UserWarning, match="padded batch"):
        got = cm.generate(ids[:, :6], attention_mask=mask, max_new_tokens=4, **GREEDY)
    assert torch.equal(got, cm.hf_model.generate(ids[:, :6], attention_mask=mask,
                                                 max_new_tokens=4, **GREEDY))
    padded = ids[:1, :6].clone()
    padded[0, 0] = 0  # transformers reads pad tokens in a prompt without a mask as padding
    with pytest.warns(UserWarning, match="pad_token_id=0"):
        got = cm.generate(padded, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, cm.hf_model.generate(padded, max_new_tokens=4, do_sample=False,
                                                 pad_token_id=0))
    with pytest.warns(UserWarning, match="num_beams=2"):
        cm.generate(ids[:1, :6], num_beams=2, max_new_tokens=3, **GREEDY)
    opt = abqc.compile(tiny_models["opt"], wbits=4, abits=8)
    assert "not an RMSNorm" in engine_unsupported(opt.hf_model)
    with pytest.warns(UserWarning, match="'opt'"):
        opt.generate(ids[:1, :6], max_new_tokens=3, **GREEDY)


def test_engine_refuses_a_wrong_batch(compiled, ids):
    eng = DecodeEngine(compiled["llama"].hf_model)
    eng.reset(1)
    with pytest.raises(ValueError, match=r"batch=1"):
        eng.step(ids[:, :3])
    with pytest.raises(ValueError, match="at least 1"):
        eng.reset(0)


def test_saved_loaded_and_from_pretrained_generate_the_same(compiled, ids, tmp_path):
    cm = compiled["qwen2"]
    cm.save(tmp_path / "m")
    prompt = ids[:1, :7]
    ref = cm.generate(prompt, max_new_tokens=12, **GREEDY)
    loaded = abqc.load(tmp_path / "m")
    assert torch.equal(loaded.generate(prompt, max_new_tokens=12, **GREEDY), ref)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(generate(hf, prompt, max_new_tokens=12, **GREEDY), ref)
