"""Each pass on a small before-graph (the Toy module of conftest), asserting on the after-graph."""
import pytest
import torch

from abqc.capture import linear_nodes
from abqc.config import CompileConfig
from abqc.ir import ANNOT_KEY, ROLE_KEY
from abqc.ops import OPS
from abqc.facts import WeightCodes, facts
from abqc.passes import (AnnotateQuant, InsertQuantDequant, PassContext, QuantDequantFusion,
                         RoundToNearest, pipeline)
from abqc.passes.graph_utils import get_tensor


def count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op)


def run(gm, *passes):
    with torch.no_grad(), PassContext():
        for p in passes:
            gm = p(gm)
    return gm


def by_path(gm):
    return {n.meta[ANNOT_KEY].path if n.meta.get(ANNOT_KEY) else None: n for n in linear_nodes(gm)}


def test_annotate_global_overrides_and_exclude(toy):
    _, gm, _ = toy
    cfg = CompileConfig(wbits=4, abits=8, overrides={"fc3": {"wbits": 8, "abits": 16}},
                        exclude=("fc2",))
    gm = run(gm, AnnotateQuant(cfg))
    anns = {n.meta["abqc.path"]: n.meta[ANNOT_KEY] for n in linear_nodes(gm)}
    assert anns["fc2"] is None
    assert anns["fc1"].weight.bits == 4 and anns["fc1"].act.bits == 8
    assert anns["fc3"].weight.bits == 8 and anns["fc3"].act is None
    assert anns["fc1"].act.granularity == "token" and anns["fc1"].act.dynamic
    # annotation only: no new nodes
    assert count(gm, OPS.quantize.default) == 0


def test_annotate_group_and_skip(toy):
    _, gm, _ = toy
    cfg = CompileConfig(wbits=3, group_size=16, overrides={"fc[12]": {"skip": True}}, backend="fake_quant")
    gm = run(gm, AnnotateQuant(cfg))
    anns = {n.meta["abqc.path"]: n.meta[ANNOT_KEY] for n in linear_nodes(gm)}
    assert anns["fc1"] is None and anns["fc2"] is None
    assert anns["fc3"].weight.granularity == "group" and anns["fc3"].weight.group_size == 16


def test_insert_quant_dequant(toy):
    model, gm, x = toy
    cfg = CompileConfig(wbits=4, abits=8, group_size=16, backend="fake_quant")
    gm = run(gm, AnnotateQuant(cfg), InsertQuantDequant())
    # fc1 and fc2 read the same x: one activation quantizer, shared; fc3 its own
    assert count(gm, OPS.choose_qparams.default) == 2
    assert count(gm, OPS.quantize.default) == 2 + 3
    assert count(gm, OPS.dequantize.default) == 2 + 3
    lins = linear_nodes(gm)
    for lin in lins:
        assert lin.args[0].target is OPS.dequantize.default
        assert lin.args[0].meta[ROLE_KEY] == "act_quant"
        assert lin.args[1].target is OPS.dequantize.default
        assert lin.args[1].meta[ROLE_KEY] == "weight_quant"
    assert lins[0].args[0] is lins[1].args[0]
    # weight grids: [N, ceil(K / 16)]
    assert get_tensor(gm, "fc1.weight_scale").shape == (24, 3)
    assert get_tensor(gm, "fc3.weight_scale").shape == (40, 2)
    # still numerically close to the float model at these widths
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert not torch.equal(ref, out)
    assert (out - ref).norm() / ref.norm() < 0.15


def test_insert_weight_only_adds_no_activation_nodes(toy):
    _, gm, _ = toy
    gm = run(gm, AnnotateQuant(CompileConfig(wbits=4, abits=16)), InsertQuantDequant())
    assert count(gm, OPS.choose_qparams.default) == 0
    assert count(gm, OPS.quantize.default) == 3


def test_round_to_nearest_folds_weights_into_codes(toy):
    _, gm, x = toy
    gm = run(gm, AnnotateQuant(CompileConfig(wbits=3, abits=8)), InsertQuantDequant())
    with torch.no_grad():
        before = gm(x)
    gm = run(gm, RoundToNearest())
    # no weight quantize left; the linears read stored uint8 codes; float weights are gone
    assert count(gm, OPS.quantize.default) == 2  # activation quantizers only
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"fc1.weight", "fc2.weight", "fc3.weight"}.isdisjoint(attrs)
    for name in ("fc1", "fc2", "fc3"):
        codes = get_tensor(gm, f"{name}.weight_codes")
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    with torch.no_grad():
        after = gm(x)
    assert torch.equal(before, after)


def test_fusion_turns_pairs_into_fake_quant(toy):
    _, gm, x = toy
    gm = run(gm, AnnotateQuant(CompileConfig(wbits=4, abits=6)), InsertQuantDequant(), RoundToNearest())
    with torch.no_grad():
        before = gm(x)
    gm = run(gm, QuantDequantFusion())
    assert count(gm, OPS.quantize.default) == 0
    assert count(gm, OPS.fake_quant.default) == 2
    assert count(gm, OPS.dequantize.default) == 3  # weights: dequantize(@codes)
    for lin in linear_nodes(gm):
        assert lin.args[0].target is OPS.fake_quant.default
    with torch.no_grad():
        after = gm(x)
    assert torch.allclose(before, after, atol=1e-6)


def test_fusion_leaves_unpaired_quantize(toy):
    _, gm, _ = toy
    gm = run(gm, AnnotateQuant(CompileConfig(wbits=4, abits=16)), InsertQuantDequant())
    w_quant = next(n for n in gm.graph.nodes if n.target is OPS.quantize.default)
    # a second, non-dequantize user means the pair cannot fuse
    with gm.graph.inserting_after(w_quant):
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (w_quant,))
    gm = run(gm, QuantDequantFusion())
    assert w_quant in gm.graph.nodes and extra in w_quant.users


def test_rtn_pipeline_on_tiny_llama(tiny_models, ids):
    from abqc.capture import capture

    m = tiny_models["llama"]
    gm = capture(m)
    cfg = CompileConfig(wbits=8, abits=8)
    gm = run(gm, pipeline("rtn", cfg))
    with torch.no_grad():
        ref, out = m(ids).logits, gm(ids)
    assert (out - ref).norm() / ref.norm() < 0.02
    n_lin = len(linear_nodes(gm))
    assert count(gm, OPS.dequantize.default) == n_lin - 1  # all but lm_head (lm_head_bits=16)


def test_round_to_nearest_records_per_linear_errors(toy):
    _, gm, _ = toy
    gm = run(gm, AnnotateQuant(CompileConfig(wbits=2, overrides={"fc3": {"wbits": 8}})),
             InsertQuantDequant(), RoundToNearest())
    errs = facts(gm).get(WeightCodes).rtn_errors
    assert set(errs) == {"fc1", "fc2", "fc3"}
    assert errs["fc3"] < 0.01 < errs["fc1"]
