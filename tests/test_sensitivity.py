"""SensitivityAnalysis (loss increase per component and block) and BitWidthAssignment."""
import json

import pytest
import torch
import torch.nn.functional as F

from abqc.capture import capture
from abqc.config import CompileConfig
from abqc.passes import AnnotateQuant, PassContext
from abqc.passes.sensitivity import SENSITIVITY_KEY, SensitivityAnalysis, format_sensitivity


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def annotated(tiny_models):
    cfg = CompileConfig()
    with PassContext(config=cfg):
        return AnnotateQuant(cfg)(capture(tiny_models["llama"]))


def _analyse(gm, calib, wbits, abits, out=None):
    with torch.no_grad(), PassContext(config=CompileConfig(), calib=calib):
        ref = gm(calib)
        gm = SensitivityAnalysis(wbits, abits, out=out)(gm)
        assert torch.equal(gm(calib), ref)  # analysis only: the graph is unchanged
    return gm.meta[SENSITIVITY_KEY], ref


def test_sensitivity_report_covers_components_and_blocks(annotated, calib, tmp_path):
    rep, ref = _analyse(annotated, calib, 2, 4, out=str(tmp_path / "s.json"))
    comps = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(rep["component"]) == comps
    assert all(set(d) == {"weight", "act"} for d in rep["component"].values())
    assert list(rep["block"]) == ["model.layers.0", "model.layers.1"]
    base = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), calib[:, 1:].reshape(-1)).item()
    assert rep["base_loss"] == pytest.approx(base, rel=1e-5)
    assert json.loads((tmp_path / "s.json").read_text())["component"].keys() == rep["component"].keys()
    text = format_sensitivity(rep)
    assert "down_proj" in text and "model.layers.1" in text


def test_fewer_bits_hurt_more(annotated, calib):
    low, _ = _analyse(annotated, calib, 1, 16)
    high, _ = _analyse(annotated, calib, 8, 16)
    assert "act" not in low["component"]["q_proj"]  # A16: no activation runs
    assert sum(low["block"].values()) > sum(high["block"].values())
    assert sum(abs(v) for v in high["block"].values()) < 1e-3


def test_bit_assignment_respects_budget_and_shared_input_groups(tiny_models, calib):
    from abqc.ir import ANNOT_KEY
    from abqc.passes.bitwidth import ASSIGN_KEY, BitWidthAssignment, width_cost

    m = tiny_models["llama"]
    # give k_proj narrower activations than q/v: the pass must re-unite the shared input
    cfg = CompileConfig(wbits=4, abits=8, overrides={"k_proj": {"abits": 4}})
    results = {}
    for budget in (3.0, 4.0):
        with torch.no_grad(), PassContext(config=cfg, calib=calib):
            gm = BitWidthAssignment(budget, widths=("2*", 3, 4, 6, 8))(AnnotateQuant(cfg)(capture(m)))
        rep = gm.meta[ASSIGN_KEY]
        anns = {n.meta["abqc.path"]: n.meta[ANNOT_KEY] for n in gm.graph.nodes
                if n.meta.get(ANNOT_KEY) is not None}
        sizes = {p: m.get_submodule(p).weight.numel() for p in anns}
        avg = sum(sizes[p] * width_cost(rep["widths"][p]) for p in anns) / sum(sizes.values())
        assert avg <= budget + 1e-9 and avg == pytest.approx(rep["average_bits"])
        assert len(set(rep["widths"].values())) > 1  # mixed precision, not uniform
        for blk in (0, 1):
            qkv = [anns[f"model.layers.{blk}.self_attn.{x}_proj"].act for x in "qkv"]
            assert qkv[0] == qkv[1] == qkv[2] and qkv[0].bits == 8
        results[budget] = rep["error"]
    assert results[3.0] > results[4.0]  # a tighter budget costs accuracy


def test_greedy_assignment_beats_uniform_at_the_same_budget():
    from abqc.passes.bitwidth import greedy_assign

    # two layers: one 10x more sensitive; uniform 3 bits vs the assignment at 3.0 average
    err = lambda k: {2: 16.0 * k, 3: 4.0 * k, 4: 1.0 * k}  # noqa: E731
    errors, sizes = {"a": err(10.0), "b": err(1.0)}, {"a": 100, "b": 100}
    pick = greedy_assign(errors, sizes, 3.0)
    assert pick == {"a": 4, "b": 2}
    assert sum(errors[p][pick[p]] for p in pick) < sum(errors[p][3] for p in pick)
    with pytest.raises(Exception, match="below the narrowest"):
        greedy_assign(errors, sizes, 1.0)


def test_bit_budget_option_compiles_mixed_precision(tiny_models, calib):
    import abqc

    with pytest.raises(abqc.ConfigError, match="bit_budget=0.5"):
        abqc.compile(tiny_models["llama"], bit_budget=0.5, calib=calib)
    with pytest.raises(abqc.ConfigError, match="bit_widths entry=5.5"):
        abqc.compile(tiny_models["llama"], bit_budget=3.0, bit_widths=(3, 5.5), calib=calib)
    cm = abqc.compile(tiny_models["llama"], wbits=4, bit_budget=3.0, bit_widths=(2, 3, 4), calib=calib)
    bits = {a.weight.bits for a in cm.annotations.values() if a}
    assert len(bits) > 1 and bits <= {2, 3, 4}
    assert "W2b" in cm.ir() or "W3b" in cm.ir()
