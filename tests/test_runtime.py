"""The runtime: generate through the kernels, save -> load round trips, refused checkpoints."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import abqc
from abqc.runtime.hf_quantizer import CorruptCheckpointError
from abqc.runtime.qlinear import QuantLinear
from frontends.tiny import byte_tokenizer


def _greedy(fn, prompt, steps):
    x = prompt
    for _ in range(steps):
        x = torch.cat([x, fn(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_generate_with_kv_cache_matches_fake_quant_greedy(tiny_models, ids, family):
    m = tiny_models[family]
    cm = abqc.compile(m, wbits=4, abits=8)
    ref = abqc.compile(m, wbits=4, abits=8, backend="fake_quant")
    layer = cm.hf_model.get_submodule(next(p for p, a in cm.annotations.items() if a))
    assert isinstance(layer, QuantLinear)
    assert not any(type(x) is torch.nn.Linear and x is not cm.hf_model.get_output_embeddings()
                   for x in cm.hf_model.modules())  # every quantized linear is on kernels
    prompt = ids[:, :6]  # batch of 2, decode step by step with the KV cache
    out = cm.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy(ref, prompt, 12))
    # prefill through the graph and through the module tree agree
    torch.testing.assert_close(cm(ids).logits, cm.hf_model(ids).logits, rtol=0, atol=0)


def test_save_load_round_trip_and_from_pretrained(tiny_models, ids, tmp_path):
    m = tiny_models["qwen2"]
    cm = abqc.compile(m, wbits=3, abits=8, group_size=64, tokenizer=byte_tokenizer(),
                      overrides={"down_proj": {"wbits": 6, "abits": 16}}, exclude=("lm_head",))
    want = cm(ids).logits
    out = cm.save(tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary left behind
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "abqc" and qc["version"] == abqc.__version__
    down = qc["layers"]["model.layers.0.mlp.down_proj"]
    assert (down["wbits"], down["abits"], down["group_size"]) == (6, 16, 64)
    assert qc["ignore"] == ["lm_head"] and len(qc["config_groups"]) == 2
    assert qc["manifest"] == "abqc_manifest.json" and "checksums" not in qc
    manifest = json.loads((out / "abqc_manifest.json").read_text())["files"]
    assert {"model.safetensors", "config.json"} <= set(manifest)
    loaded = abqc.load(out)
    torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    assert loaded.annotations["model.layers.1.mlp.down_proj"].weight.bits == 6
    assert loaded.tokenizer is not None
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, QuantLinear)
    torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        cm.save(out)
    cm.save(out, overwrite=True)  # overwriting an existing save works and leaves one directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_truncated_or_tampered_weights_are_refused(tiny_models, tmp_path):
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8)
    out = cm.save(tmp_path / "q")
    st = out / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors has .* bytes, the manifest says"):
        abqc.load(out)
    with pytest.raises(CorruptCheckpointError, match="truncated or was modified"):
        AutoModelForCausalLM.from_pretrained(out)
    st.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors does not match its checksum"):
        abqc.load(out)
    with pytest.raises(abqc.ConfigError, match="not a saved abqc model"):
        abqc.load(tmp_path)


def test_fake_quant_models_cannot_be_saved(tiny_models, tmp_path):
    cm = abqc.compile(tiny_models["llama"], wbits=4, backend="fake_quant")
    with pytest.raises(abqc.ConfigError, match="backend='kernels'"):
        cm.save(tmp_path / "q")
    with pytest.raises(RuntimeError, match="no transformers model tree"):
        cm.generate(torch.zeros(1, 3, dtype=torch.long))


def test_single_token_fast_path_equals_the_op():
    """The decode fast path (cached buffers and weight views) computes what abqc::qlinear does,
    bias and sparse outliers included, and notices replaced weights."""
    from abqc.runtime.format import QuantFormat

    g = torch.Generator().manual_seed(0)
    fmt = QuantFormat(n=24, k=200, wbits=3, abits=8)
    codes = torch.randint(0, 8, (24, 200), generator=g).to(torch.uint8)
    h = torch.zeros(24, 200)
    h[3, 7], h[20, 150] = 0.5, -1.25
    q = QuantLinear.from_codes(fmt, codes, torch.rand(24, 1, generator=g) + 0.1,
                               torch.full((24, 1), 3.0), bias=torch.randn(24, generator=g),
                               outliers=h.to_sparse_coo())
    x = torch.randn(1, 1, 200, generator=g)
    op = torch.ops.abqc.qlinear(x, q.weight_packed, q.weight_scale, q.weight_zero_point,
                                q.weight_sum, q.group_k, q.bias, q.outlier_indices,
                                q.outlier_values, q.spec)
    assert torch.equal(q(x), op) and "_decode_state" in q.__dict__
    q.weight_scale = q.weight_scale * 2  # a new tensor: the cached view must not be used
    op2 = torch.ops.abqc.qlinear(x, q.weight_packed, q.weight_scale, q.weight_zero_point,
                                 q.weight_sum, q.group_k, q.bias, q.outlier_indices,
                                 q.outlier_values, q.spec)
    assert torch.equal(q(x), op2) and not torch.equal(op2, op)


def test_generate_and_save_refuse_a_tree_missing_quantized_linears(tiny_models, tmp_path, monkeypatch):
    """A quantized linear no kernel takes stays fake-quantized in the graph, and the
    transformers tree would run it in float; generate and save say so, not diverge."""
    from abqc.passes import lower

    real = lower.LowerToKernels._lower

    def refuse_down(self, gm, lin, ann, path):
        if path == "model.layers.1.mlp.down_proj":
            raise lower.NotLowerable("no kernel for this test's format")
        return real(self, gm, lin, ann, path)

    monkeypatch.setattr(lower.LowerToKernels, "_lower", refuse_down)
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=16)
    missing = cm.unlowered_linears()
    assert list(missing) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(NotImplementedError, match="down_proj: quantized in the graph but could not "
                                                  "be lowered to a kernel: no kernel for this test"):
        cm.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="could not be lowered"):
        cm.save(tmp_path / "tied")
    assert not (tmp_path / "tied").exists()
    monkeypatch.undo()
    assert abqc.compile(tiny_models["llama"], wbits=4, abits=16, group_size=64).unlowered_linears() == {}


@pytest.mark.parametrize("formulation, abits", [("vnni", 8), ("unpack", 8), ("unpack", 16)])
def test_one_token_fast_path_matches_the_general_path(formulation, abits):
    """A decode step (one token) takes `QuantLinear`'s cached fast path; it must give what the
    general op gives for the same token, with bias, outliers and a bf16 input, and must notice
    a replaced buffer."""
    from abqc.codegen.vnni import vnni_supported
    from abqc.runtime.format import QuantFormat
    from abqc.runtime.qlinear import qlinear_impl

    if formulation == "vnni" and not vnni_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    g = torch.Generator().manual_seed(0)
    n, k = 37, 200
    fmt = QuantFormat(n, k, 4, abits, 0, False, formulation)
    outliers = torch.sparse_coo_tensor(torch.tensor([[1, 5], [3, 7]]), torch.tensor([0.5, -2.0]),
                                       (n, k), check_invariants=True).coalesce()
    q = QuantLinear.from_codes(fmt, torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                               torch.rand(n, 1, generator=g) + 0.5, torch.zeros(n, 1),
                               bias=torch.randn(n, generator=g), outliers=outliers)

    others = torch.randn(4, k, generator=g)

    def general(x):  # the token among others: the prefill kernel (M = 5), its first row
        batch = torch.cat([x.reshape(1, k), others])
        return qlinear_impl(batch, q.weight_packed, q.weight_scale, q.weight_zero_point,
                            q.weight_sum, q.group_k, q.bias, q.outlier_indices, q.outlier_values,
                            q.spec)[:1].reshape(*x.shape[:-1], n)

    x = torch.randn(1, 1, k, generator=g)
    y = q(x)
    assert y.shape == (1, 1, n) and "_decode_state" in q.__dict__  # the fast path ran
    torch.testing.assert_close(y, general(x), rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()
    yb = q(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, general(xb.float()).bfloat16())
    q.weight_scale = q.weight_scale * 2  # a new buffer: the cached views must not be reused
    torch.testing.assert_close(q(x), general(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(q(x), y)


def test_load_and_generate_never_run_torch_export(tiny_models, tmp_path, ids, monkeypatch):
    """A loaded model owns its tensors in the transformers tree; the graph is captured only
    when asked for (cm(ids)), so `abqc.load` + `generate` (and `abqc generate DIR`) start at once."""
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8)
    cm.save(tmp_path / "m")
    real = torch.export.export

    def refuse(*a, **k):
        raise AssertionError("torch.export ran")

    monkeypatch.setattr(torch.export, "export", refuse)
    loaded = abqc.load(tmp_path / "m")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids[:1, :5], **kw), cm.generate(ids[:1, :5], **kw))
    monkeypatch.setattr(torch.export, "export", real)
    with torch.no_grad():  # the graph on first use: the same program as the tree
        assert torch.equal(loaded(ids).logits, loaded.hf_model(ids).logits)
    assert loaded.annotations == cm.annotations
