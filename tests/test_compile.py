"""abqc.compile: argument validation, quality per bit width, and the compiled graph's life."""
import io

import pytest
import torch

import abqc
from abqc import CompileConfig, ConfigError, UnsupportedModelError

from conftest import FAMILIES


def rel_err(cm, m, ids):
    with torch.no_grad():
        ref = m(ids).logits
        out = cm(ids).logits
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("kwargs, match", [
    (dict(wbits=0), r"wbits=0 .*1, 2, 3, 4, 5, 6, 7, 8"),
    (dict(wbits=9), r"wbits=9 "),
    (dict(wbits="4"), r"wbits='4' "),
    (dict(wbits=True), r"wbits=True "),
    (dict(abits=12), r"abits=12 .*16"),
    (dict(abits=0), r"abits=0 "),
    (dict(group_size=-1), r"group_size=-1"),
    (dict(method="awq"), r"method='awq' .*rtn"),
    (dict(wbits=4, bogus=1), r"unknown option\(s\) \['bogus'\]; allowed options: .*'group_size'"),
    (dict(overrides={"down_proj": {"wbitz": 8}}), r"unknown keys \['wbitz'\]"),
    (dict(overrides={"down_proj": {"wbits": 12}}), r"wbits=12"),
    (dict(overrides={"down_proj": 8}), r"must be a dict"),
    (dict(exclude=("lm_head[",)), r"'lm_head\[' is not a valid regex"),
    (dict(nsamples=0), r"nsamples=0"),
])
def test_bad_arguments_name_the_value_and_the_allowed_ones(tiny_models, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        abqc.compile(tiny_models["llama"], **kwargs)


def test_bad_model_and_calib(tiny_models):
    with pytest.raises(ConfigError, match="nn.Module"):
        abqc.compile("llama", wbits=4)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        abqc.compile(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), wbits=4)
    with pytest.raises(ConfigError, match="calib must be"):
        abqc.compile(tiny_models["llama"], wbits=4, calib="some text")


@pytest.mark.parametrize("family", FAMILIES)
def test_error_falls_as_bits_grow(tiny_models, family, ids):
    m = tiny_models[family]
    errs = [rel_err(abqc.compile(m, wbits=b, abits=b), m, ids) for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.02, errs


def test_compiled_model_output_and_shapes(tiny_models):
    m = tiny_models["qwen2"]
    cm = abqc.compile(m, wbits=6, abits=6)
    assert isinstance(cm, torch.nn.Module) and isinstance(cm, abqc.CompiledModel)
    for shape in [(1, 1), (1, 50), (4, 9)]:
        ids = torch.randint(0, 256, shape)
        assert cm(ids).logits.shape == (*shape, m.config.vocab_size)
    assert cm.config == CompileConfig(wbits=6, abits=6)
    anns = cm.annotations
    assert anns["lm_head"] is None  # float by default (lm_head_bits=16)
    assert sum(a is not None for a in anns.values()) == len(anns) - 1
    head = abqc.compile(m, wbits=6, abits=6, lm_head_bits=8).annotations["lm_head"]
    # lm_head_bits=8: 8-bit per-channel weights, activations at max(abits, 8), rounded
    assert (head.weight.bits, head.weight.group_size, head.act.bits, head.method) == (8, 0, 8, "rtn")
    assert [name for _, name, _ in cm.pass_timings][0] == "AnnotateQuant"


def test_weight_only_and_overrides(tiny_models, ids):
    m = tiny_models["mistral"]
    cm = abqc.compile(m, wbits=2, abits=16, group_size=64, overrides={r"down_proj": {"wbits": 8}})
    anns = cm.annotations
    down = [a for p, a in anns.items() if p.endswith("down_proj")]
    other = [a for p, a in anns.items() if a and not p.endswith(("down_proj", "lm_head"))]
    assert down and all(a.weight.bits == 8 and a.act is None for a in down)
    assert other and all(a.weight.bits == 2 and a.weight.group_size == 64 for a in other)
    # raising down_proj to 8 bits helps
    plain = abqc.compile(m, wbits=2, abits=16, group_size=64)
    assert rel_err(cm, m, ids) < rel_err(plain, m, ids)


def test_original_model_is_unchanged(tiny_models, ids):
    m = tiny_models["llama"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    abqc.compile(m, wbits=2, abits=2)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_print_ir_shows_paths_and_annotations(tiny_models):
    cm = abqc.compile(tiny_models["opt"], wbits=4, abits=8, group_size=32, backend="fake_quant",
                      exclude=("lm_head",))
    buf = io.StringIO()
    cm.print_ir(file=buf)
    text = buf.getvalue()
    assert "model.decoder.layers.0.self_attn.q_proj  [W4b g32 asym | A8b per-token asym dynamic | rtn]" in text
    assert "lm_head  [float]" in text
    assert "abqc.fake_quant" in text and "abqc.dequantize" in text


def test_compiled_graph_reexports_and_round_trips(tiny_models, tmp_path, ids):
    from torch.export import Dim

    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8)
    dims = {"input_ids": {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=128)}}
    ep = torch.export.export(cm.graph_module, (ids,), strict=False, dynamic_shapes=dims)
    path = tmp_path / "cm.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        assert torch.equal(loaded(ids), cm(ids).logits)
        short = ids[:1, :5]
        assert torch.equal(loaded(short), cm(short).logits)
