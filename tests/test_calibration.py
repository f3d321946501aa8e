"""Block-sequential calibration: order from the graph, block input caching, the Calibrate pass."""
import pytest
import torch

import abqc
from abqc.calibration.blocks import capture_block_inputs, decoder_blocks, run_block
from abqc.calibration.order import sequential_groups
from abqc.capture import capture
from abqc.ops import OPS


@pytest.mark.parametrize("family, prefix, groups", [
    ("llama", "model.layers", [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("qwen2", "model.layers", [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("opt", "model.decoder.layers", [["k_proj", "q_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
])
def test_true_sequential_groups_come_from_the_graph(tiny_models, family, prefix, groups):
    m = tiny_models[family]
    assert decoder_blocks(m)[0] == prefix
    got = sequential_groups(capture(m), prefix)
    assert sorted(got) == [0, 1]
    for b in (0, 1):
        assert [[p.rsplit(".", 1)[1] for p in g] for g in got[b]] == groups


@pytest.mark.parametrize("family", ["llama", "mistral", "opt"])
def test_cached_inputs_through_the_blocks_give_the_model(tiny_models, family):
    m = tiny_models[family]
    _, blocks = decoder_blocks(m)
    ids = torch.randint(0, 256, (3, 20))
    cached = capture_block_inputs(m, blocks, ids, batch_size=2)
    assert [c.hidden.shape[0] for c in cached] == [2, 1]
    with torch.no_grad():
        for c in cached:
            for b in blocks:
                c.hidden = run_block(b, c)
        ref = m(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
    final = m.model.norm if family != "opt" else m.model.decoder.final_layer_norm
    assert torch.allclose(final(torch.cat([c.hidden for c in cached])), ref, atol=1e-5)


def test_data_methods_need_data(tiny_models):
    with pytest.raises(abqc.ConfigError, match="needs calibration data"):
        abqc.compile(tiny_models["llama"], wbits=4, method="gptq")
    with pytest.raises(abqc.ConfigError, match="LongTensor"):
        abqc.compile(tiny_models["llama"], wbits=4, method="gptq", calib=torch.zeros(2, 8))


def _held_out_error(cm, model, ids):
    with torch.no_grad():
        return ((cm(ids).logits - model(input_ids=ids).logits) ** 2).mean().item()


@pytest.fixture(scope="module")
def calib_and_test():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (16, 48), generator=g), torch.randint(0, 256, (4, 48), generator=g)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_gptq_calibration_beats_rtn_end_to_end(tiny_models, calib_and_test, family, caplog):
    m = tiny_models[family]
    calib, test = calib_and_test
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rtn = _held_out_error(abqc.compile(m, wbits=3, method="rtn"), m, test)
    with caplog.at_level("INFO", logger="abqc"):
        cm = abqc.compile(m, wbits=3, method="gptq", calib=calib)
    assert _held_out_error(cm, m, test) < rtn
    # one log line per solved linear, with its relative error and peak memory
    solved = [p for p, a in cm.annotations.items() if a is not None]
    lines = [r.getMessage() for r in caplog.records if "rel.err" in r.getMessage()]
    assert len(lines) == len(solved) and all("peak" in l for l in lines)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # user's model untouched
    stats = cm.calibration_stats
    assert set(stats) == set(solved) and all(0 < s["rel_error"] < 1 for s in stats.values())


def test_every_method_compiles_and_outliers_are_graph_nodes(tiny_models, calib_and_test):
    m = tiny_models["llama"]
    calib, test = calib_and_test
    rtn = _held_out_error(abqc.compile(m, wbits=3, method="rtn"), m, test)
    for method in ("quantease", "gptq_quantease", "quantease_outlier"):
        cm = abqc.compile(m, wbits=3, method=method, calib=calib, solver_options={"sweeps": 6},
                          backend="fake_quant")
        assert _held_out_error(cm, m, test) < rtn, method
        adds = [n for n in cm.graph_module.graph.nodes if n.target is OPS.add_outliers.default]
        assert len(adds) == (len(cm.calibration_stats) if method == "quantease_outlier" else 0)
    assert "add_outliers" in cm.ir()
    # lowered: the sparse outliers ride along into each qlinear, and the logits agree
    low = abqc.compile(m, wbits=3, method="quantease_outlier", calib=calib,
                       solver_options={"sweeps": 6})
    q = [n for n in low.graph_module.graph.nodes if str(n.target) == "abqc.qlinear.default"]
    assert sum(n.args[8] is not None for n in q) == len(low.calibration_stats) > 0
    torch.testing.assert_close(low(test).logits, cm(test).logits, rtol=1e-4, atol=1e-4)


def test_calibration_with_quantized_activations_and_overrides(tiny_models, calib_and_test):
    m = tiny_models["llama"]
    calib, test = calib_and_test
    cm = abqc.compile(m, wbits=4, abits=8, method="gptq", calib=calib,
                      overrides={"down_proj": {"method": "quantease", "wbits": 6}},
                      solver_options={"sweeps": 4})
    stats = cm.calibration_stats
    assert {p: s["method"] for p, s in stats.items() if "down_proj" in p} == \
        {"model.layers.0.mlp.down_proj": "quantease", "model.layers.1.mlp.down_proj": "quantease"}
    assert {s["method"] for p, s in stats.items() if "down_proj" not in p} == {"gptq"}
    assert _held_out_error(cm, m, test) < _held_out_error(
        abqc.compile(m, wbits=4, abits=8, overrides={"down_proj": {"wbits": 6}}), m, test)


def test_bad_solver_option_is_refused_before_any_work(tiny_models, calib_and_test):
    with pytest.raises(abqc.ConfigError, match="unknown solver option"):
        abqc.compile(tiny_models["llama"], wbits=4, method="gptq", calib=calib_and_test[0],
                     solver_options={"damp": 0.1})


def test_compiled_graph_moves_with_to(tiny_models, ids):
    """`cm.to(device)` also moves the devices export baked into the graph (arange, mask
    casts). On the meta device any leftover CPU constant fails the forward."""
    cm = abqc.compile(tiny_models["llama"], wbits=3, method="quantease_outlier",
                      calib=torch.randint(0, 256, (4, 32)), backend="fake_quant",
                      solver_options={"sweeps": 2})
    ref = cm(ids).logits
    cm.to("meta")
    out = cm(ids.to("meta")).logits
    assert out.device.type == "meta" and out.shape == ref.shape
    assert all(p.device.type == "meta" for p in cm.graph_module.buffers())


def test_calib_device_is_checked(tiny_models):
    m = tiny_models["llama"]
    with pytest.raises(abqc.ConfigError, match="calib_device='gpu'"):
        abqc.compile(m, wbits=3, method="gptq", calib_device="gpu")
    with pytest.raises(abqc.ConfigError, match="layer-wise"):
        abqc.compile(m, wbits=3, method="abq", calib_device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(abqc.ConfigError, match="needs a CUDA GPU"):
            abqc.compile(m, wbits=3, method="gptq", calib=torch.randint(0, 256, (2, 16)),
                         calib_device="cuda", backend="fake_quant")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gptq", "quantease", "quantease_outlier"])
def test_calibration_on_cuda_matches_cpu(tiny_models, method):
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    runs = {d: abqc.compile(tiny_models["llama"], wbits=3, method=method, calib=calib,
                            backend="fake_quant", calib_device=d, solver_options={"sweeps": 4})
            for d in ("cpu", "cuda")}
    a, b = (runs[d].calibration_stats for d in ("cpu", "cuda"))
    assert a.keys() == b.keys()
    for p in a:
        assert b[p]["rel_error"] == pytest.approx(a[p]["rel_error"], rel=0.05, abs=1e-4)
