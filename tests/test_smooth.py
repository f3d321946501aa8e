"""Smooth: smoothing pairs found from the graph, folded so the float model is unchanged."""
import pytest
import torch

import abqc
from abqc.capture import capture
from abqc.config import CompileConfig
from abqc.passes import AnnotateQuant, PassContext
from abqc.passes.graph_utils import get_tensor
from abqc.facts import SmoothPairs, facts
from abqc.passes.smooth import Smooth
from abqc.passes.smooth_pairs import find_smooth_pairs, fold_smoothing

EXPECTED = {  # family -> (source, consumers) per block, in graph order
    "llama": [("input_layernorm", ["q_proj", "k_proj", "v_proj"]), ("v_proj", ["o_proj"]),
              ("post_attention_layernorm", ["gate_proj", "up_proj"]), ("up_proj", ["down_proj"])],
    "opt": [("self_attn_layer_norm", ["q_proj", "k_proj", "v_proj"]), ("v_proj", ["out_proj"]),
            ("final_layer_norm", ["fc1"]), ("fc1", ["fc2"])],
}
EXPECTED["qwen2"] = EXPECTED["mistral"] = EXPECTED["llama"]


def _short(p):
    return p.rsplit(".", 1)[-1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_pairs_come_from_the_graph(tiny_models, family):
    gm = capture(tiny_models[family])
    quantized = {p for p in _linear_paths(gm) if "lm_head" not in p}
    pairs = find_smooth_pairs(gm, quantized)
    got = [(_short(p.source), [_short(c) for c in p.consumers]) for p in pairs]
    assert got == EXPECTED[family] * 2
    vo = [p for p in pairs if _short(p.source) == "v_proj"]
    if family == "opt":
        assert all(p.index is None for p in vo)
    else:  # GQA 4 query heads / 2 KV heads, head_dim 16: o channel (h, d) <- v channel (h // 2, d)
        idx = vo[0].index
        assert vo[0].channels == 32 and idx.shape == (64,)
        assert idx[:16].tolist() == list(range(16)) and idx[16:32].tolist() == list(range(16))
        assert idx[32:48].tolist() == list(range(16, 32))
    # the final norm feeds lm_head, which is excluded: no pair
    assert not any("lm_head" in c for p in pairs for c in p.consumers)


def _linear_paths(gm):
    from abqc.capture import linear_nodes, module_path
    return [module_path(n) for n in linear_nodes(gm)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_folding_any_scales_keeps_the_logits(tiny_models, ids, family):
    m = tiny_models[family]
    gm = capture(m)
    with torch.no_grad():
        ref = gm(ids)
    pairs = find_smooth_pairs(gm, set(_linear_paths(gm)) - {"lm_head"})
    g = torch.Generator().manual_seed(0)
    for pair in pairs:
        fold_smoothing(gm, pair, torch.exp(torch.randn(pair.channels, generator=g)))
    with torch.no_grad():
        out = gm(ids)
    w = pairs[0].consumer_weights[0]
    assert not torch.equal(get_tensor(gm, w), m.get_parameter(w[2:]))  # weights did change
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smooth_pass_keeps_logits_and_the_users_model(tiny_models, ids, family):
    m = tiny_models[family]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gm = capture(m)
    with torch.no_grad():
        ref = gm(ids)
    cfg = CompileConfig(abits=8)
    with torch.no_grad(), PassContext(config=cfg, calib=torch.randint(0, 256, (4, 32))):
        gm = Smooth(alpha=0.5)(AnnotateQuant(cfg)(gm))
        out = gm(ids)
    assert len(facts(gm).get(SmoothPairs).pairs) == 8
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_smoothquant_scales_flatten_activation_outliers():
    """An outlier input channel gets a large s: X/s has a smaller max, W*s absorbs it."""
    from abqc.passes.smooth import smoothquant_scales
    from abqc.passes.smooth_pairs import SmoothPair

    pair = SmoothPair("norm", "n", "n.weight", None, ["a"], ["a.weight"], 4)
    x = torch.tensor([1.0, 1.0, 100.0, 1.0])
    w = torch.ones(4)
    s = smoothquant_scales(pair, x, w, alpha=0.5)
    assert torch.allclose(s, x.sqrt())
    assert (x / s).max() < x.max() / 5


def test_smooth_option_compiles_and_needs_data(tiny_models):
    m = tiny_models["llama"]
    with pytest.raises(abqc.ConfigError, match="needs calibration data"):
        abqc.compile(m, wbits=4, abits=8, smooth=True)
    with pytest.raises(abqc.ConfigError, match="smooth_alpha"):
        abqc.compile(m, wbits=4, abits=8, smooth=True, smooth_alpha=2)
    cm = abqc.compile(m, wbits=8, abits=8, smooth=True, calib=torch.randint(0, 256, (4, 32)))
    assert [p.name for p in _passes(cm)][:2] == ["AnnotateQuant", "Smooth"]


def _passes(cm):
    return [type("P", (), {"name": n}) for _, n, _ in cm.pass_timings]
