"""LowerToKernels: the before/after graph, and the lowered model against the fake-quant one."""
import pytest
import torch

import abqc
from abqc.ir import FLOAT_REASON_KEY, KERNELS_KEY, is_qlinear
from abqc.ops import OPS
from abqc.facts import Lowered, facts
from abqc.passes import InsertQuantDequant, LowerToKernels, QuantDequantFusion, RoundToNearest
from abqc.passes import AnnotateQuant, PassContext, Sequential
from abqc.config import CompileConfig
from abqc.runtime.format import QuantFormat
from abqc.runtime.qlinear import QuantLinear


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


def test_before_after_graph(toy):
    model, gm, x = toy
    cfg = CompileConfig(wbits=4, abits=8, exclude=("fc3",))
    with torch.no_grad(), PassContext(config=cfg):
        before = Sequential([AnnotateQuant(cfg), InsertQuantDequant(), RoundToNearest(),
                             QuantDequantFusion()])(gm)
        ref = before(x)
        assert _count(before, torch.ops.aten.linear.default) == 3
        assert _count(before, OPS.choose_qparams.default) == 1  # fc1 and fc2 share their input
        after = LowerToKernels(tune=False)(before)
    q = [n for n in after.graph.nodes if is_qlinear(n)]
    assert [n.meta["abqc.path"] for n in q] == ["fc1", "fc2"]
    assert _count(after, torch.ops.aten.linear.default) == 1  # fc3 stays float
    for op in (OPS.choose_qparams.default, OPS.fake_quant.default, OPS.dequantize.default):
        assert _count(after, op) == 0, op
    assert not any("weight_codes" in n.target for n in after.graph.nodes if n.op == "get_attr")
    fc3 = next(n for n in after.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert "excluded" in fc3.meta[FLOAT_REASON_KEY]
    assert set(q[0].meta[KERNELS_KEY]) == {1, 16, 128}
    assert isinstance(after.get_submodule("fc1"), QuantLinear)  # the packed module is in place
    assert after.get_submodule("fc1").bias is not None and after.get_submodule("fc2").bias is None
    fmt = QuantFormat.parse(q[0].args[-1])
    assert (fmt.n, fmt.k, fmt.wbits, fmt.abits) == (24, 40, 4, 8)
    torch.testing.assert_close(after(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_lowered_logits_match_fake_quant(tiny_models, ids, family):
    m = tiny_models[family]
    # asymmetric activations: the symmetric grid puts -max|x| exactly on a rounding tie, so
    # 1-ulp differences upstream flip codes there and the two paths drift apart by design
    # (symmetric activations are checked per kernel in test_codegen)
    for kw in (dict(wbits=4, abits=8), dict(wbits=3, abits=16), dict(wbits=2, abits=4, symmetric=True)):
        ref = abqc.compile(m, backend="fake_quant", **kw)(ids).logits
        got = abqc.compile(m, **kw)(ids).logits
        # float-accumulating kernels (unpack) differ from the graph by float32 rounding, which
        # can move an activation across a rounding boundary in a later layer: one grid step
        tol = 1e-5 if kw["abits"] == 16 else 5e-3
        torch.testing.assert_close(got, ref, rtol=0, atol=tol * float(ref.abs().max()),
                                   msg=f"{family} {kw}")


def test_groups_and_unaligned_groups(tiny_models, ids):
    m = tiny_models["llama"]  # hidden 64, ffn 128 (see frontends/tiny.py)
    cm = abqc.compile(m, wbits=4, abits=16, group_size=64)
    ref = abqc.compile(m, wbits=4, abits=16, group_size=64, backend="fake_quant")
    torch.testing.assert_close(cm(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    specs = {n.meta["abqc.path"]: n.args[-1] for n in cm.graph_module.graph.nodes if is_qlinear(n)}
    assert "lm_head" not in specs and specs and all(",g=64," in sp for sp in specs.values())
    eight = abqc.compile(m, wbits=4, abits=16, group_size=64, lm_head_bits=8)
    head = next(n.args[-1] for n in eight.graph_module.graph.nodes
                if is_qlinear(n) and n.meta["abqc.path"] == "lm_head")
    assert ",w=8,a=16,g=0," in head  # the output projection: per channel at lm_head_bits
    # a group size the kernels cannot take is refused before anything runs, naming the value
    with pytest.raises(abqc.ConfigError, match="group_size=32 does not fit the integer kernels"):
        abqc.compile(m, wbits=4, abits=8, group_size=32)
    with pytest.raises(abqc.ConfigError, match=r"overrides\['down_proj'\].group_size=48"):
        abqc.compile(m, wbits=4, abits=8, overrides={"down_proj": {"group_size": 48}})
    abqc.compile(m, wbits=4, abits=8, group_size=32, backend="fake_quant")  # simulated: fine


def test_bad_backend_is_refused():
    with pytest.raises(abqc.ConfigError, match="backend='tvm'.*kernels"):
        CompileConfig(backend="tvm")


def test_tied_lm_head_runs_on_an_8_bit_kernel_beside_the_float_embedding(ids, tmp_path):
    """lm_head tied to the embedding (SmolLM2's case): the embedding lookup keeps the float
    tensor under its own name, lm_head becomes a W8A8 QuantLinear, and graph, tree, saved and
    from_pretrained agree; the saved config no longer ties the two."""
    from transformers import AutoModelForCausalLM

    from abqc.runtime.qlinear import QuantLinear
    from frontends.tiny import tiny_model

    m = tiny_model("llama", tie_word_embeddings=True)
    cm = abqc.compile(m, wbits=4, abits=8, lm_head_bits=8)
    assert facts(cm.graph_module).get(Lowered).float_linears == {}
    assert isinstance(cm.hf_model.lm_head, QuantLinear) and ",w=8,a=8," in cm.hf_model.lm_head.spec
    assert torch.equal(cm.hf_model.model.embed_tokens.weight, m.model.embed_tokens.weight)
    assert m.config.tie_word_embeddings and not cm.hf_model.config.tie_word_embeddings
    with torch.no_grad():
        logits = cm(ids).logits
        assert torch.equal(logits, cm.hf_model(ids).logits)
        cm.save(tmp_path / "t")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "t")(ids).logits, logits)
        # the 8-bit head costs little next to the float one
        ref, flt = m(ids).logits, abqc.compile(m, wbits=4, abits=8, lm_head_bits=16)(ids).logits
        err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
        assert err(logits) < 1.1 * err(flt), (err(logits), err(flt))


def test_smoothing_skips_a_consumer_whose_weight_is_tied(ids):
    """The final norm feeds the tied lm_head: scaling lm_head's columns would scale the
    embedding too, so no pair is formed there."""
    from abqc.passes.smooth_pairs import find_smooth_pairs
    from frontends.tiny import tiny_model

    from abqc.capture import capture
    from abqc.passes.smooth_pairs import _tensor_readers
    gm = capture(tiny_model("llama", tie_word_embeddings=True))
    head = next(n for n in gm.graph.nodes if n.meta.get("abqc.path") == "lm_head")
    readers = _tensor_readers(gm)[id(gm.get_parameter(head.args[1].target))]
    assert head in readers and any("embedding" in str(r.target) for r in readers)  # tied
    assert not any("lm_head" in c for p in find_smooth_pairs(gm) for c in p.consumers)
    assert find_smooth_pairs(gm)  # the other pairs are still found
