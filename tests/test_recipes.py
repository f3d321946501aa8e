"""The command line generated from CompileConfig, schemes, recipe files, logging, the cache,
perplexity statistics and the compile report (fast: no model compiles but one fake-quant)."""
import argparse
import dataclasses
import io
import json
import logging
import math

import pytest
import torch

import abqc
from abqc import recipes
from abqc.cli import build_parser, main
from abqc.config import CompileConfig
from abqc.errors import ConfigError

#: A valid non-default command-line value for fields whose values are constrained, and the
#: Python value it must give. Fields not listed get a generic one by type (below).
SAMPLES = {
    "wbits": ("2*", "2*"), "abits": ("8", 8), "group_size": ("64", 64), "method": ("gptq", "gptq"),
    "overrides": ('{"down_proj": {"wbits": 8}}', {"down_proj": {"wbits": 8}}),
    "exclude": ("lm_head,embed", ("lm_head", "embed")), "lm_head_bits": ("16", 16),
    "nsamples": ("7", 7), "seqlen": ("33", 33), "seed": ("5", 5), "calib_corpus": ("wikitext2", "wikitext2"),
    "solver_options": ('{"sweeps": 3}', {"sweeps": 3}), "calib_device": ("cuda:1", "cuda:1"),
    "backend": ("fake_quant", "fake_quant"), "smooth_alpha": ("0.25", 0.25),
    "abq_options": ('{"epochs": 2}', {"epochs": 2}), "kv_bits": ("8", 8), "bit_budget": ("3.5", 3.5),
    "bit_widths": ("2*,4,8", ("2*", 4, 8)), "bit_sensitivity": ("loss", "loss"),
    "max_seq_len": ("256", 256), "dump_ir": ("out/ir", "out/ir"),
}


def _generic_sample(f: dataclasses.Field):
    """A command-line value and the Python value for a field by its kind alone."""
    kind, optional = recipes.field_kinds()[f.name]
    default = recipes.field_default(f)
    if kind == "bool":
        return (f"--no-{recipes.flag_for(f.name)[2:]}" if default else recipes.flag_for(f.name)), \
            (False if default else True)
    if optional:
        return "none", None
    return {"int": ("3", 3), "float": ("0.5", 0.5), "str": ("x", "x"), "bits": ("3", 3),
            "list": ("a,b", ("a", "b")), "intlist": ("1,2", (1, 2)),
            "mapping": ('{"k": 1}', {"k": 1})}[kind]


def _args(cmd_argv):
    return build_parser().parse_args(cmd_argv)


@pytest.mark.parametrize("cmd", ["compile", "eval", "generate", "lm-eval"])
def test_every_config_field_is_a_flag_of_every_command(cmd):
    head = {"compile": ["compile"], "eval": ["eval"], "generate": ["generate", "m", "p"],
            "lm-eval": ["lm-eval", "--tasks", "t"]}[cmd]
    for f in dataclasses.fields(CompileConfig):  # a new field is covered here by itself
        text, want = _generic_sample(f)
        if f.name in SAMPLES and recipes.field_kinds()[f.name][0] != "bool":
            text, want = SAMPLES[f.name]
        flag = recipes.flag_for(f.name)
        argv = head + ([text] if text.startswith("--") else [flag, text])
        got = recipes.explicit_options(_args(argv))
        assert got == {f.name: want}, f"CompileConfig.{f.name} is not settable as {argv}"


def test_sampled_flags_build_the_config_they_name():
    argv = ["compile"]
    for name, (text, _) in SAMPLES.items():
        if name in ("calib_device", "bit_budget", "method", "backend"):
            continue  # (combinations the config refuses: checked one by one below)
        argv += [recipes.flag_for(name), text]
    cfg = recipes.config_from_args(_args(argv + ["--smooth", "--symmetric", "--no-tune"]))
    for name, (_, want) in SAMPLES.items():
        if name not in ("calib_device", "bit_budget", "method", "backend"):
            assert getattr(cfg, name) == want, name
    assert cfg.smooth and cfg.symmetric and cfg.tune is False and not cfg.act_symmetric
    for name in ("calib_device", "bit_budget", "method", "backend"):
        text, want = SAMPLES[name]
        assert getattr(recipes.config_from_args(_args(["compile", recipes.flag_for(name), text])), name) == want


def test_a_new_field_becomes_a_flag_and_an_unknown_type_is_refused(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Wider(CompileConfig):
        brand_new: int = 3

    monkeypatch.setattr(recipes, "CompileConfig", Wider)
    p = argparse.ArgumentParser()
    recipes.add_config_args(p)
    assert recipes.explicit_options(p.parse_args(["--brand-new", "5"])) == {"brand_new": 5}

    @dataclasses.dataclass(frozen=True)
    class Odd(CompileConfig):
        odd: set = frozenset()

    monkeypatch.setattr(recipes, "CompileConfig", Odd)
    with pytest.raises(TypeError, match="CompileConfig.odd has type"):
        recipes.add_config_args(argparse.ArgumentParser())


def test_help_comes_from_one_place():
    names = {f.name for f in dataclasses.fields(CompileConfig)}
    assert set(recipes.FIELD_HELP) <= names, f"stale help for {set(recipes.FIELD_HELP) - names}"
    text = build_parser()._subparsers._group_actions[0].choices["compile"].format_help()
    for name in names:
        assert recipes.flag_for(name) in text
    assert "abq" in recipes.field_help("method") and "'2*'" in recipes.field_help("wbits")


def test_bad_flag_values_name_the_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--abq-options", "{epochs: 2}"])
    assert e.value.code == 2 and "'{epochs: 2}' is not a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compile", "--wbits", "two"])
    assert "'two' is not a bit width; use 1..8 or '2*'" in capsys.readouterr().err
    assert main(["compile", "--model", "tiny:llama", "--abq-options", '{"epochz": 2}']) == 2
    assert "epochz" in capsys.readouterr().err
    assert main(["compile", "--model", "tiny:llama", "--scheme", "W9A8"]) == 2
    err = capsys.readouterr().err
    assert "scheme 'W9A8' is not allowed" in err and "W2*A8" in err


def test_schemes():
    assert recipes.parse_scheme("W4A8") == {"wbits": 4, "abits": 8}
    assert recipes.parse_scheme("w4a16g128") == {"wbits": 4, "abits": 16, "group_size": 128}
    assert recipes.parse_scheme("W2*A8") == {"wbits": "2*", "abits": 8}
    for bad in ("W4", "W4A12", "4A8", "W0A8"):
        with pytest.raises(ConfigError, match=f"scheme '{bad}'"):
            recipes.parse_scheme(bad)


def test_recipe_then_scheme_then_flags(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("model: tiny:opt\nwbits: 3\nabits: 8\nmethod: gptq\nexclude: [lm_head]\n"
                 "solver_options: {sweeps: 4}\n")
    opts, extras = recipes.options_from_args(_args(["compile", "--recipe", str(y)]))
    assert opts == {"wbits": 3, "abits": 8, "method": "gptq", "exclude": ("lm_head",),
                    "solver_options": {"sweeps": 4}} and extras == {"model": "tiny:opt"}
    opts, _ = recipes.options_from_args(_args(["compile", "--recipe", str(y), "--scheme", "W6A6",
                                               "--abits", "16", "--solver", "act_order=true"]))
    assert (opts["wbits"], opts["abits"], opts["method"]) == (6, 16, "gptq")
    assert opts["solver_options"] == {"sweeps": 4, "act_order": True}
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"wbits": 4, "bogus": 1}))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bogus'\]"):
        recipes.load_recipe(j)
    j.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        recipes.load_recipe(j)
    with pytest.raises(ConfigError, match="cannot be read"):
        recipes.load_recipe(tmp_path / "missing.yaml")


def test_a_saved_recipe_reproduces_the_config(tmp_path):
    cfg = CompileConfig(wbits="2*", abits=8, method="abq", abq_options={"epochs": 1},
                        exclude=("lm_head",), overrides={"down_proj": {"wbits": 8}}, nsamples=4)
    path = recipes.write_recipe(tmp_path, cfg, model="tiny:llama")
    opts, extras = recipes.load_recipe(path)
    assert CompileConfig.from_options(**opts) == cfg
    assert extras["model"] == "tiny:llama" and extras["abqc_version"] == abqc.__version__


def test_set_verbosity_is_quiet_by_default_and_restorable():
    from abqc.log import logger, reset_verbosity, verbosity

    assert not any(type(h).__name__ == "TqdmHandler" for h in logger.handlers)
    assert not logger.isEnabledFor(logging.INFO)  # a library: info off unless asked
    buf = io.StringIO()
    with verbosity("info", stream=buf):
        logging.getLogger("abqc.passes").info("hello %d", 1)
        logging.getLogger("abqc").debug("hidden")
    assert buf.getvalue() == "[abqc] hello 1\n"
    assert logger.propagate and not logger.isEnabledFor(logging.INFO)
    try:
        buf2 = io.StringIO()
        abqc.set_verbosity("debug", stream=buf2)
        logging.getLogger("abqc").debug("shown")
        assert "shown" in buf2.getvalue()
    finally:
        reset_verbosity()
    with pytest.raises(ConfigError, match="verbosity 'loud' is not allowed"):
        abqc.set_verbosity("loud")


def test_cache_root_and_commands(tmp_path, monkeypatch, capsys):
    from abqc import cache

    monkeypatch.delenv("ABQC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "abqc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache.cache_root().parts[-2:] == (".cache", "abqc")
    monkeypatch.setenv("ABQC_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == tmp_path / "c"
    (cache.cache_dir("tuning") / "kernels.jsonl").write_text("x" * 1000)
    (cache.cache_dir("kernels") / "a.so").write_bytes(b"y" * 10)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "c") in out and "tuning" in out and "kernels" in out and "re-tuning" in out
    assert main(["cache", "clear"]) == 2
    assert "name what to clear (kernels, tuning)" in capsys.readouterr().err
    assert main(["cache", "clear", "nope"]) == 2
    assert "cache entry 'nope' is not in" in capsys.readouterr().err
    assert main(["cache", "clear", "kernels"]) == 0
    assert [r["name"] for r in cache.info()] == ["tuning"]
    assert main(["cache", "clear", "--all"]) == 0 and cache.info() == []


class _Logits(torch.nn.Module):
    """A fixed-logit toy LM: logits = embed(ids) @ W."""

    def __init__(self, seed, vocab=11, dim=6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.e = torch.randn(vocab, dim, generator=g)
        self.w = torch.randn(dim, vocab, generator=g)

    def forward(self, ids):
        return type("Out", (), {"logits": self.e[ids] @ self.w})()


def test_perplexity_statistics_against_a_reference():
    from abqc.eval import perplexity_of_windows

    win = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(0))
    a, b = _Logits(0), _Logits(1)
    r = perplexity_of_windows(a, win, progress=False, reference=a)
    assert r["kld_mean"] == pytest.approx(0, abs=1e-6) and r["same_top_p"] == 1 and r["ppl_ratio"] == pytest.approx(1)
    r = perplexity_of_windows(a, win, batch_size=2, progress=False, reference=b)
    la = torch.log_softmax(a(win).logits[:, :-1].double(), -1)
    lb = torch.log_softmax(b(win).logits[:, :-1].double(), -1)
    nll = -la.gather(-1, win[:, 1:, None])[..., 0].flatten()
    kld = (lb.exp() * (lb - la)).sum(-1).flatten()
    n = nll.numel()
    assert r["tokens_predicted"] == n == 24
    assert r["nll"] == pytest.approx(float(nll.mean())) and r["ppl"] == pytest.approx(math.exp(nll.mean()))
    assert r["nll_stderr"] == pytest.approx(float(nll.std(unbiased=False) / math.sqrt(n - 1)), rel=1e-6)
    assert r["ppl_stderr"] == pytest.approx(r["ppl"] * r["nll_stderr"])
    assert r["kld_mean"] == pytest.approx(float(kld.mean()), rel=1e-4) and r["kld_mean"] > 0.01
    assert r["kld_max"] == pytest.approx(float(kld.max()), rel=1e-4)
    same = float((la.argmax(-1) == lb.argmax(-1)).double().mean())
    assert r["same_top_p"] == pytest.approx(same) and 0 < same < 1
    ref_nll = -lb.gather(-1, win[:, 1:, None])[..., 0].flatten()
    assert r["ppl_ratio"] == pytest.approx(math.exp(float((nll - ref_nll).mean())))
    assert r["reference_ppl"] == pytest.approx(math.exp(float(ref_nll.mean())))


def test_report_counts_codes_and_scales(tiny_models):
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8, group_size=64, backend="fake_quant",
                      lm_head_bits=16)
    rep = cm.report()
    lin = {n: m for n, m in tiny_models["llama"].named_modules() if isinstance(m, torch.nn.Linear)}
    q = {p: lin[p] for p, a in cm.annotations.items() if a is not None}
    assert "lm_head" not in q and rep.quantized == len(q) and rep.linears == len(lin)
    weights = sum(m.weight.numel() for m in q.values())
    grid = sum(m.out_features * math.ceil(m.in_features / 64) * 64 for m in q.values())
    assert rep.code_bits == 4 and rep.bits_per_weight == pytest.approx((4 * weights + grid) / weights)
    total = sum(p.numel() for p in tiny_models["llama"].parameters())
    assert rep.float_mb == pytest.approx(4 * total / 1e6)
    assert rep.mb == pytest.approx(((4 * weights + grid) / 8 + 4 * (total - weights)) / 1e6)
    assert [n for n, _ in rep.pass_seconds][0] == "AnnotateQuant"
    line = str(rep)
    assert line.startswith("W4A8g64 rtn: ") and f"{rep.bits_per_weight:.3f} bits/weight with scales" in line
