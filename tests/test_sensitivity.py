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
