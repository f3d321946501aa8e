"""kv_bits: Q and K fake-quantized per token and head after RoPE, V per token."""
import pytest
import torch

import abqc
from abqc.ir import ROLE_KEY
from abqc.ops import OPS
from abqc.passes.kv_quant import KV_QUANT


def _err(cm, m, ids):
    with torch.no_grad():
        return (cm(ids).logits - m(input_ids=ids).logits).abs().max().item()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_kv_quant_nodes_and_granularity(tiny_models, ids, family):
    m = tiny_models[family]
    cm = abqc.compile(m, wbits=8, kv_bits=4)
    nodes = [n for n in cm.graph_module.graph.nodes if n.meta.get(ROLE_KEY) == KV_QUANT]
    chooses = [n for n in nodes if n.target is OPS.choose_qparams.default]
    assert len(chooses) == 3 * 2  # Q, K, V in each of the 2 blocks
    ndims = sorted(n.args[0].meta["val"].ndim for n in chooses)
    assert ndims == [3, 3, 4, 4, 4, 4]  # V per token [b, s, C]; Q, K per token and head
    # Q and K are quantized right before attention reads them (after RoPE)
    attn = [n for n in cm.graph_module.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    for a in attn:
        assert all(x.meta.get(ROLE_KEY) == KV_QUANT for x in a.args[:2])
    assert "kv_quant of" in cm.ir()


def test_kv_bits_off_by_default_and_error_grows_as_bits_shrink(tiny_models, ids):
    m = tiny_models["llama"]
    base = abqc.compile(m, wbits=8)
    assert not any(n.meta.get(ROLE_KEY) == KV_QUANT for n in base.graph_module.graph.nodes)
    e16 = _err(base, m, ids)  # kv_bits defaults to 16
    e8, e3 = (_err(abqc.compile(m, wbits=8, kv_bits=b), m, ids) for b in (8, 3))
    assert e16 < e8 < e3


def test_bad_kv_bits_is_refused(tiny_models):
    with pytest.raises(abqc.ConfigError, match="kv_bits=0"):
        abqc.compile(tiny_models["llama"], wbits=4, kv_bits=0)


def test_generate_and_save_refuse_graph_only_attention_quantization(tiny_models, tmp_path):
    import abqc as _abqc

    cm = _abqc.compile(tiny_models["llama"], wbits=8, abits=8, kv_bits=4)
    with pytest.raises(NotImplementedError, match="kv_bits=4"):
        cm.generate(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="kv_bits=4"):
        cm.save(tmp_path / "q")
