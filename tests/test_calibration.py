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
