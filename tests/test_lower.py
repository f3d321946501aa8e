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
    assert all("g=64" in n.args[-1] for n in cm.graph_module.graph.nodes if is_qlinear(n))
    # a group size the kernels cannot take is refused before anything runs, naming the value
    with pytest.raises(abqc.ConfigError, match="group_size=32 does not fit the integer kernels"):
        abqc.compile(m, wbits=4, abits=8, group_size=32)
    with pytest.raises(abqc.ConfigError, match=r"overrides\['down_proj'\].group_size=48"):
        abqc.compile(m, wbits=4, abits=8, overrides={"down_proj": {"group_size": 48}})
    abqc.compile(m, wbits=4, abits=8, group_size=32, backend="fake_quant")  # simulated: fine


def test_bad_backend_is_refused():
    with pytest.raises(abqc.ConfigError, match="backend='tvm'.*kernels"):
        CompileConfig(backend="tvm")


def test_tied_lm_head_stays_off_the_kernels_with_its_reason(ids):
    """lm_head tied to the embedding: its module also holds the embedding's float weight, so
    the packed module cannot replace it; it stays a fake-quant linear and the IR says why."""
    from frontends.tiny import tiny_model

    m = tiny_model("llama", tie_word_embeddings=True)
    cm = abqc.compile(m, wbits=4, abits=8, exclude=())
    assert "tied weights" in facts(cm.graph_module).get(Lowered).float_linears["lm_head"]
    ref = abqc.compile(m, wbits=4, abits=8, exclude=(), backend="fake_quant")
    torch.testing.assert_close(cm(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)
