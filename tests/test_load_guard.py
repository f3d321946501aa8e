"""A saved abqc directory loaded by plain transformers (abqc not imported) is an error that
names abqc, never a model with random linears; with abqc imported it loads as before."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import abqc
from abqc.runtime.hf_guard import GUARD_KEY, GUARD_MODEL_TYPE, guard_config, unguard_config
from abqc.runtime.qlinear import QuantLinear
from frontends.tiny import FAMILIES, byte_tokenizer, tiny_config

# Runs in a fresh interpreter: transformers alone, every way it could load the directory.
PLAIN = r"""
import json, sys
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM
d = sys.argv[1]
out = {}
for name, load in [("AutoModelForCausalLM", AutoModelForCausalLM.from_pretrained),
                   ("AutoModel", AutoModel.from_pretrained),
                   ("LlamaForCausalLM", LlamaForCausalLM.from_pretrained)]:
    try:
        load(d)
        out[name] = "loaded"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
out["abqc imported"] = any(m == "abqc" or m.startswith("abqc.") for m in sys.modules)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8, tokenizer=byte_tokenizer())
    return cm, cm.save(tmp_path_factory.mktemp("guard") / "q")


def test_plain_transformers_refuses_a_saved_model_naming_abqc(saved):
    _, out = saved
    r = subprocess.run([sys.executable, "-c", PLAIN, str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res.pop("abqc imported") is False
    for entry, msg in res.items():
        assert msg != "loaded", f"{entry} loaded the packed checkpoint as a float model"
        assert "import abqc" in msg, (entry, msg)
    assert res["AutoModelForCausalLM"].startswith("ValueError")  # AutoConfig: unknown model type


def test_with_abqc_every_loader_works_and_gives_the_saved_logits(saved, ids):
    cm, out = saved
    want = cm(ids).logits
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == GUARD_MODEL_TYPE and raw[GUARD_KEY]["model_type"] == "llama"
    assert raw["quantization_config"]["quant_method"] == "abqc"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.model.layers[0].mlp.down_proj, QuantLinear)
    assert hf.config.model_type == "llama" and not hasattr(hf.config, GUARD_KEY)
    torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=0)
    torch.testing.assert_close(abqc.load(out)(ids).logits, want, rtol=0, atol=0)
    cfg = AutoConfig.from_pretrained(out)
    assert type(cfg).__name__ == "LlamaConfig" and cfg.hidden_size == 64
    assert cfg.quantization_config["quant_method"] == "abqc"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("guard").input_ids) == "guard"


def test_a_directory_saved_before_the_guard_still_loads(saved, ids, tmp_path):
    import shutil

    cm, out = saved
    old = tmp_path / "old"
    shutil.copytree(out, old)
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(unguard_config(cfg)))
    from abqc.runtime.manifest import write_manifest
    write_manifest(old)  # (such a directory was saved whole: its manifest covers this config)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(old)(ids).logits,
                               cm(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_guard_holds_for_every_family(family, tmp_path):
    """AutoConfig undoes the guard (abqc imported); the family's own config class, which
    abqc cannot reach, is refused with the hint instead of building a model."""
    ref = tiny_config(family)
    cfg = ref.to_dict()
    g = guard_config(cfg)
    assert unguard_config(g) == cfg and guard_config(g) == g and cfg["model_type"] == family
    (tmp_path / "config.json").write_text(json.dumps(g))
    back = AutoConfig.from_pretrained(tmp_path)
    assert type(back) is type(ref)
    assert {**back.to_dict(), "_name_or_path": ""} == {**ref.to_dict(), "_name_or_path": ""}
    with pytest.raises(Exception, match="import abqc.*abqc.load") as e:
        type(ref).from_pretrained(tmp_path)
    assert "hidden_size" in str(e.value)


def test_damaged_or_unguardable_configs_are_clear_errors():
    with pytest.raises(abqc.ConfigError, match=r"model_type=None"):
        guard_config({"hidden_size": 64})
    with pytest.raises(abqc.ConfigError, match=r"'abqc_guard' entry is None"):
        unguard_config({"model_type": GUARD_MODEL_TYPE})
    with pytest.raises(abqc.ConfigError, match=r"'abqc_guard' entry is \{'hidden_size': 1\}"):
        guard_config({"model_type": GUARD_MODEL_TYPE, GUARD_KEY: {"hidden_size": 1}})
    with pytest.raises(abqc.ConfigError, match=r"already has a 'abqc_guard' entry"):
        guard_config({"model_type": "llama", GUARD_KEY: {}})
    with pytest.raises(abqc.ConfigError, match="takes a config dict, got list"):
        guard_config([])
