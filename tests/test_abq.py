"""ABQ: DLC/AKL losses, the explicit attention map, down_proj compensation nodes,
bit balance (2*), and block calibration that beats RTN and is folded into the graph."""
import pytest
import torch

import abqc
from abqc.facts import CalibrationStats, facts
from abqc.calibration.blocks import capture_block_inputs, decoder_blocks, run_block
from abqc.calibration.losses import akl, attention_map, dlc
from abqc.capture import capture
from abqc.config import CompileConfig
from abqc.ir import format_graph
from abqc.passes import AnnotateQuant, DownProjCompensation, InsertQuantDequant, PassContext
from abqc.passes.graph_utils import get_tensor, set_buffer


def test_dlc_is_zero_for_identical_outputs_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g)
    assert dlc(x, x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert dlc(x, x * 3.0, x).item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    y = x + 0.3 * torch.randn(x.shape, generator=g)
    assert dlc(y, x, x).item() > 1e-3
    assert dlc(y, x, x).item() > dlc(y, x, y).item() > 0  # each target counts


def test_akl_is_zero_for_identical_maps_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 9, 32, generator=g), torch.randn(2, 9, 16, generator=g)
    a = attention_map(q, k, n_heads=4, n_kv_heads=2, head_dim=8)
    assert torch.allclose(a.sum(-1), torch.ones(2, 9), atol=1e-5)
    assert torch.all(a.triu(1) == 0)  # causal
    assert akl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    b = attention_map(q + 0.5 * torch.randn(q.shape, generator=g), k, 4, 2, 8)
    assert akl(a, b).item() > 1e-4
    assert akl(a, b).item() == pytest.approx(akl(b, a).item(), rel=1e-5)  # symmetric


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_explicit_attention_map_reproduces_the_models_attention(tiny_models, family):
    """softmax(QKᵀ) (with RoPE and GQA) from the projections' outputs, times V, is what
    the model's attention feeds its output projection."""
    m = tiny_models[family]
    _, blocks = decoder_blocks(m)
    inp = capture_block_inputs(m, blocks, torch.randint(0, 256, (2, 20)), 2)[0]
    attn = blocks[0].self_attn
    seen = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, o))
             for n in ("q_proj", "k_proj", "v_proj")]
    out_proj = attn.o_proj if family != "opt" else attn.out_proj
    hooks.append(out_proj.register_forward_pre_hook(lambda mod, a: seen.__setitem__("o_in", a[0])))
    with torch.no_grad():
        run_block(blocks[0], inp)
    for h in hooks:
        h.remove()
    cfg = m.config
    H, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", H)
    b, s, _ = seen["q_proj"].shape
    rot = inp.kwargs.get("position_embeddings")
    heads = []
    for h in range(H):  # one head at a time: the head-averaged map of one head is its map
        qh = seen["q_proj"].view(b, s, H, hd)[:, :, h]
        kh = seen["k_proj"].view(b, s, kv, hd)[:, :, h // (H // kv)]
        vh = seen["v_proj"].view(b, s, kv, hd)[:, :, h // (H // kv)]
        heads.append(attention_map(qh, kh, 1, 1, hd, rot) @ vh)
    assert torch.allclose(torch.stack(heads, 2).reshape(b, s, -1), seen["o_in"], atol=1e-5)


def test_bit_balance_grid_has_five_symmetric_levels_stored_as_three_bits():
    cfg = CompileConfig(wbits="2*")
    spec = cfg.annotation_for("model.layers.0.mlp.down_proj").weight
    assert (spec.qmax, spec.bits, spec.symmetric, spec.balanced) == (4, 3, True, True)
    assert "2*" in spec.describe()
    from abqc.quantizer import dequantize, qparams_for, quantize
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    s, z = qparams_for(w, spec)
    assert torch.all(z == 2)
    codes = quantize(w, s, z, spec.qmax)
    assert set(codes.unique().tolist()) == {0, 1, 2, 3, 4}
    levels = (dequantize(codes, s, z) / s).round()
    assert set(levels.unique().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}  # symmetric around 0
    assert torch.allclose(dequantize(codes, s, z).abs().amax(1), w.abs().amax(1))  # the max is a level


@pytest.mark.parametrize("bad", ["2**", "3*", "2", 2.5])
def test_bad_wbits_is_refused_naming_the_value(bad):
    with pytest.raises(abqc.ConfigError, match=r"wbits=.*'2\*'"):
        CompileConfig(wbits=bad)


def test_bit_balance_compiles_with_codes_up_to_four(tiny_models, ids):
    m = tiny_models["llama"]
    cm = abqc.compile(m, wbits="2*", abits=16, backend="fake_quant", lm_head_bits=16)
    codes = [get_tensor(cm.graph_module, n.target) for n in cm.graph_module.graph.nodes
             if n.op == "get_attr" and n.target.endswith("weight_codes")]
    assert codes and max(int(c.max()) for c in codes) == 4
    assert all(a.weight.bits == 3 for a in cm.annotations.values() if a)  # packs as 3 bits
    low = abqc.compile(m, wbits="2*", abits=16, lm_head_bits=16)  # on the 3-bit kernels
    specs = [n.args[-1] for n in low.graph_module.graph.nodes if str(n.target) == "abqc.qlinear.default"]
    assert specs and all(",w=3," in sp for sp in specs)
    torch.testing.assert_close(low(ids).logits, cm(ids).logits, rtol=1e-4, atol=1e-5)
    two = abqc.compile(m, wbits=2, abits=16)
    err = lambda c: (c(ids).logits - m(input_ids=ids).logits).pow(2).mean().item()  # noqa: E731
    with torch.no_grad():
        assert err(cm) < err(two)  # 5 levels beat 4


def test_compensation_is_visible_then_folded(tiny_models, ids):
    m = tiny_models["llama"]
    cfg = CompileConfig(wbits=8)
    gm = capture(m)
    with torch.no_grad(), PassContext(config=cfg):
        gm = InsertQuantDequant()(AnnotateQuant(cfg)(gm))
        before = gm(ids)
        gm = DownProjCompensation("insert", first=1, last=0)(gm)
        assert torch.equal(gm(ids), before)  # a = 0: nothing changes yet
        ir = format_graph(gm)
        assert "@m.model.layers.0.mlp.down_proj.comp_a" in ir
        assert "compensation of model.layers.0.mlp.down_proj" in ir
        assert "layers.1.mlp.down_proj.comp_a" not in ir  # only the first block here
        g = torch.Generator().manual_seed(0)
        set_buffer(gm, "m.model.layers.0.mlp.down_proj.comp_a", 0.01 * torch.randn(64, 1, generator=g))
        set_buffer(gm, "m.model.layers.0.mlp.down_proj.comp_b", torch.randn(1, 128, generator=g))
        trained = gm(ids)
        assert not torch.allclose(trained, before)
        gm = DownProjCompensation("fold")(gm)
        assert torch.allclose(gm(ids), trained, atol=1e-6)
        assert "comp_a" not in format_graph(gm)


def test_abq_beats_rtn_block_loss_and_is_folded_into_the_graph(tiny_models, monkeypatch, tmp_path):
    """W4A4 on tiny Llama: every block's trained loss is below RTN's on the same inputs, and
    the compiled graph computes exactly what the trained blocks computed."""
    import abqc.passes.abq as abq_pass

    m = tiny_models["llama"]
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    kept = {}
    real = abq_pass.run_blocks

    def spy(model, windows, step, batch_size=8, fp_chain=False, desc=""):
        def step2(b, local, qblock, inputs, fp_block, fp_inputs):
            step(b, local, qblock, inputs, fp_block, fp_inputs)
            kept["inputs"] = inputs  # run_blocks then runs them through the trained block
        real(model, windows, step2, batch_size, fp_chain, desc)

    monkeypatch.setattr(abq_pass, "run_blocks", spy)
    cm = abqc.compile(m, wbits=4, abits=4, calib=calib, method="abq", lm_head_bits=16,
                      abq_options={"epochs": 4, "batch_size": 1, "comp_first": 1, "comp_last": 1})
    stats = facts(cm.graph_module).get(CalibrationStats).blocks
    assert sorted(stats) == [0, 1]
    for b, s in stats.items():
        assert s["loss_final"] < s["loss_rtn"], (b, s)
        assert s["loss_final"] <= s["loss_init"]
    assert "comp_a" not in cm.ir() and "mm" not in cm.ir()  # compensation folded away
    with torch.no_grad():
        hidden = torch.cat([i.hidden for i in kept["inputs"]])  # the last trained block's outputs
        chain = m.lm_head(m.model.norm(hidden))
        assert torch.allclose(cm(calib).logits, chain, atol=1e-4)
        # ... and so does the transformers tree that generate and save run (one store)
        assert torch.equal(cm.hf_model(calib).logits, cm(calib).logits)
        # everything learnt lives in the graph's tensors: a saved and reloaded export agrees
        path = tmp_path / "abq.pt2"
        torch.export.save(torch.export.export(cm.graph_module, (calib[:2],), strict=False), path)
        again = torch.export.load(path).module()
        assert torch.allclose(again(calib[:2]), cm(calib[:2]).logits, atol=1e-6)


def test_abq_options_are_validated(tiny_models):
    m = tiny_models["llama"]
    with pytest.raises(abqc.ConfigError, match="unknown abq option"):
        abqc.compile(m, wbits=4, method="abq", abq_options={"lr": 1})
    with pytest.raises(abqc.ConfigError, match="preset='gpu'"):
        abqc.compile(m, wbits=4, method="abq", abq_options={"preset": "gpu"})
    with pytest.raises(abqc.ConfigError, match="cannot be mixed"):
        abqc.compile(m, wbits=4, method="abq", overrides={"down_proj": {"method": "gptq"}})


@pytest.mark.parametrize("fallback", [True, False])
def test_a_block_that_loses_to_rtn_falls_back_to_rtn(tiny_models, fallback):
    """Clipping started at sigmoid(-1) = 27% of the range and nothing learnt (learning rates 0):
    the start and the 'trained' state both lose to RTN; with the fall-back the block keeps
    RTN's state (on its SmoothQuant-folded weights), without it the start."""
    import abqc.passes.abq as abq_pass

    calib = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    opts = {"epochs": 1, "lwc_init": -1.0, "lwc_lr": 0.0, "smooth_lr": 0.0, "comp_lr": 0.0,
            "comp_first": 1, "comp_last": 1, "rtn_fallback": fallback}
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8, calib=calib, method="abq",
                      abq_options=opts)
    for b, s in facts(cm.graph_module).get(CalibrationStats).blocks.items():
        assert s["loss_init"] > 1.5 * s["loss_rtn"], (b, s)  # the start is worse
        if fallback:  # RTN on the smoothed weights: near plain RTN's loss, far below the start
            assert s["kept"] == "rtn" and s["loss_final"] < min(s["loss_init"] / 1.5, 2 * s["loss_rtn"]), (b, s)
        else:
            assert s["kept"] != "rtn" and s["loss_final"] == s["loss_init"], (b, s)
