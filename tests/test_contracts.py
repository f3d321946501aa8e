"""Pass contracts: a pipeline with a missing or misordered pass is refused before it runs."""
import pytest
import torch

import abqc
from abqc.capture import capture
from abqc.config import CompileConfig
from abqc.facts import Annotated, QuantDequant, SmoothPairs, Source, WeightCodes, facts
from abqc.passes import (ABQCalibrate, AnnotateQuant, Calibrate, DownProjCompensation,
                         InsertQuantDequant, Pass, PassContext, PassInstrument, PIPELINES,
                         QuantDequantFusion, RoundToNearest, Sequential, Smooth, pipeline)


class Count(PassInstrument):
    def __init__(self):
        self.ran = []

    def run_before_pass(self, gm, p, index):
        self.ran.append(p.name)


@pytest.fixture
def program(tiny_models):
    return capture(tiny_models["llama"])


def test_capture_attaches_the_source_skeleton_without_tensors(tiny_models, program):
    src = facts(program).get(Source)
    assert src.model_type == "llama" and src.max_seq_len == 512
    assert all(p.is_meta for p in src.skeleton.parameters())  # no second copy of the weights
    assert type(src.skeleton) is type(tiny_models["llama"])


def test_abq_without_smooth_is_refused_before_any_pass_runs(program):
    cfg = CompileConfig(wbits=4, abits=8, method="abq")
    seen = Count()
    passes = [AnnotateQuant(cfg), InsertQuantDequant(), ABQCalibrate(), RoundToNearest()]
    with pytest.raises(abqc.ConfigError, match=r"pass 2: pass ABQCalibrate requires SmoothPairs"):
        with PassContext([seen], config=cfg):
            Sequential(passes, name="test")(program)
    assert seen.ran == []  # refused up front: nothing ran, nothing changed
    assert Annotated not in facts(program)


@pytest.mark.parametrize("passes,match", [
    (lambda c: [AnnotateQuant(c), InsertQuantDequant(), RoundToNearest(), Smooth()],
     "Smooth must run before any pass that ensures QuantDequant, WeightCodes"),
    (lambda c: [AnnotateQuant(c), InsertQuantDequant(), DownProjCompensation("insert"), RoundToNearest()],
     "RoundToNearest must run before any pass that ensures Compensation"),
    (lambda c: [AnnotateQuant(c), DownProjCompensation("fold")],
     "DownProjCompensation requires Compensation"),
    (lambda c: [AnnotateQuant(c), InsertQuantDequant(), QuantDequantFusion(), Calibrate()],
     None),  # legal order: checks pass
])
def test_misordered_pipelines_name_the_pass_and_the_fact(program, passes, match):
    cfg = CompileConfig(wbits=4, abits=8)
    seq = Sequential(passes(cfg), name="test")
    if match is None:
        seq.check({Source})
        return
    with pytest.raises(abqc.ConfigError, match=match):
        seq.check({Source})


def test_every_named_pipeline_satisfies_its_own_contracts():
    for name in PIPELINES:
        for kw in ({}, {"smooth": True}, {"kv_bits": 8}, {"bit_budget": 4.0}):
            method = "gptq" if name == "calibrate" else name
            cfg = CompileConfig(method=method, abits=8, **kw)
            pipeline(name, cfg).check({Source})  # raises if misordered


def test_calibration_needs_a_captured_program(toy):
    """A graph exported by hand has no Source fact (no model tree to calibrate): refused."""
    _, gm, _ = toy
    cfg = CompileConfig(wbits=4, method="gptq")
    with torch.no_grad(), PassContext(config=cfg, calib=torch.randint(0, 8, (2, 4))):
        gm = InsertQuantDequant()(AnnotateQuant(cfg)(gm))
        with pytest.raises(abqc.ConfigError, match="Calibrate requires Source"):
            Calibrate()(gm)


def test_a_pass_cannot_claim_a_fact_it_did_not_attach(program):
    class Liar(Pass):
        ensures = (SmoothPairs,)

        def transform(self, gm):
            return gm

    with pytest.raises(AssertionError, match="Liar declares it ensures SmoothPairs"):
        Liar()(program)


def test_facts_are_typed_and_named(program):
    cfg = CompileConfig(wbits=4)
    with torch.no_grad(), PassContext(config=cfg):
        gm = RoundToNearest()(InsertQuantDequant()(AnnotateQuant(cfg)(program)))
    store = facts(gm)
    assert [Annotated, QuantDequant, WeightCodes] == [k for k in (Annotated, QuantDequant, WeightCodes)
                                                      if k in store]
    assert store.get(Annotated).quantized == 14  # 7 linears x 2 blocks; lm_head float
    assert store.get(Annotated).output_path == "lm_head"
    assert set(store.get(WeightCodes).rtn_errors) == {p for p, a in
                                                      _annotations(gm).items() if a}
    with pytest.raises(abqc.ConfigError, match="needs the program fact SmoothPairs"):
        store.require(SmoothPairs, "a reader")


def _annotations(gm):
    from abqc.capture import PATH_KEY, is_linear
    from abqc.ir import ANNOT_KEY
    return {n.meta[PATH_KEY]: n.meta.get(ANNOT_KEY) for n in gm.graph.nodes
            if is_linear(n) or str(n.target) == "abqc.qlinear.default"}
