"""Rotate: the residual stream in a randomized-Hadamard basis, folded into the weights."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import abqc
from abqc.agreement import outlier_model
from abqc.capture import capture
from abqc.config import CompileConfig
from abqc.facts import Rotation, facts
from abqc.passes import PassContext, Rotate
from abqc.passes.graph_utils import get_tensor
from abqc.passes.rotate import random_rotation
from frontends.tiny import tiny_model


@pytest.mark.parametrize("n", [64, 128, 576, 96])
def test_rotation_is_orthogonal(n):
    q = random_rotation(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(q, random_rotation(n, seed=4))  # the seed matters


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False),
                                         ("mistral", False)])
def test_before_after_same_function_rotated_weights(family, tied, ids):
    m = tiny_model(family, tie_word_embeddings=tied)
    gm = capture(m)
    before = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    with torch.no_grad():
        ref = gm(ids)
        with PassContext(config=CompileConfig()):
            gm = Rotate("hadamard", seed=0)(gm)
        out = gm(ids)
    # same function (float64 folding, float32 weights): to float32 rounding
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    calls = lambda g: [str(n.target) for n in g.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert calls(gm) == before  # no new op: only tensors changed (and, tied, a get_attr name)
    q = facts(gm).get(Rotation).q
    norm = get_tensor(gm, "m.model.layers.0.input_layernorm.weight")
    assert torch.equal(norm, torch.ones_like(norm))  # folded into q/k/v
    emb = get_tensor(gm, "m.model.embed_tokens.weight")
    assert torch.allclose(emb.double(), m.model.embed_tokens.weight.double() @ q, atol=1e-5)
    assert not torch.equal(emb, m.model.embed_tokens.weight)


def test_rotation_helps_w4a4_on_outliers_and_reaches_every_path(ids, tmp_path):
    m = outlier_model(tiny_model("llama", tie_word_embeddings=True))
    with torch.no_grad():
        m.model.norm.weight.copy_(torch.linspace(0.5, 2.0, 64))  # lm_head E diag(g) Q != E Q
        ref = m(ids).logits
        err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
        plain = abqc.compile(m, wbits=4, abits=4)
        rot = abqc.compile(m, wbits=4, abits=4, rotate="hadamard")
        assert err(rot(ids).logits) < 0.8 * err(plain(ids).logits)
        graph = rot(ids).logits
        assert torch.equal(graph, rot.hf_model(ids).logits)
        rot.save(tmp_path / "r")
        assert torch.equal(abqc.load(tmp_path / "r").hf_model(ids).logits, graph)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "r")(ids).logits, graph)
        # float lm_head: the tree unties it from the (rotated) embedding as the program does
        flt = abqc.compile(m, wbits=4, abits=8, rotate="hadamard", lm_head_bits=16)
        assert torch.equal(flt(ids).logits, flt.hf_model(ids).logits)
        assert not flt.hf_model.config.tie_word_embeddings


@pytest.mark.parametrize("method", ["gptq", "abq"])
def test_rotation_composes_with_calibration(method, ids, tmp_path):
    m = outlier_model(tiny_model("qwen2"))
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    extra = {"abq_options": {"epochs": 1, "batch_size": 2}} if method == "abq" else {}
    cm = abqc.compile(m, wbits=4, abits=8, method=method, rotate="hadamard", calib=calib,
                      nsamples=4, seqlen=32, **extra)
    with torch.no_grad():
        ref = m(ids).logits
        assert torch.equal(cm(ids).logits, cm.hf_model(ids).logits)
        assert float((cm(ids).logits - ref).norm() / ref.norm()) < 0.5
    assert [r[1] for r in cm.pass_timings][0] == "Rotate"


def test_rotation_refuses_layernorm_models_and_bad_kinds():
    with pytest.raises(abqc.ConfigError, match="rotate='hadamard' needs RMSNorm decoder blocks; "
                                               "model_type='opt'"):
        abqc.compile(tiny_model("opt"), wbits=4, rotate="hadamard")
    with pytest.raises(abqc.ConfigError, match="rotate='givens' is not allowed"):
        abqc.compile(tiny_model("llama"), wbits=4, rotate="givens")
