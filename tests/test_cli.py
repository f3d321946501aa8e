"""The `abqc` command line: compile with IR dumps, eval to JSON, clear errors."""
import json
import os
import re
import subprocess
import sys

import pytest

from abqc.cli import main, parse_override


def test_compile_dumps_one_readable_file_per_pass(tmp_path, capsys):
    out = tmp_path / "ir"
    rc = main(["-q", "compile", "--model", "tiny:llama", "--wbits", "4", "--abits", "8",
               "--override", "down_proj:wbits=8", "--dump-ir", str(out)])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["000_AnnotateQuant.txt", "001_InsertQuantDequant.txt", "002_RoundToNearest.txt",
                     "003_QuantDequantFusion.txt", "004_LowerToKernels.txt", "input.txt"]
    final = (out / "004_LowerToKernels.txt").read_text()
    assert "model.layers.0.mlp.down_proj  [W8b per-channel asym | A8b per-token asym dynamic | rtn]" in final
    assert "w=8,a=8" in final and "kernels m1=" in final
    assert "lm_head  [float]  float: not quantized (excluded by the config, or lm_head_bits=16)" in final
    assert "model.layers.1.self_attn.q_proj  [W4b per-channel asym | A8b" in final
    out = capsys.readouterr().out
    assert re.search(r"compiled W4A8 rtn: 1[45]/15 linears quantized, [0-9.]+ bits/weight with scales", out)
    assert "not saved: pass --out DIR" in out


def test_eval_writes_json(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    js = tmp_path / "r.json"
    rc = main(["-q", "eval", "--model", "tiny:opt", "--wbits", "4", "--abits", "8", "--data", str(data),
               "--seqlen", "128", "--max-windows", "3", "--json", str(js), "--reference", "source"])
    assert rc == 0
    res = json.loads(js.read_text())
    assert res["windows"] == 3 and res["wbits"] == 4 and res["abits"] == 8 and res["ppl"] > 1
    assert res["reference"] == "tiny:opt" and res["kld_mean"] > 0 and res["config"]["abits"] == 8
    assert "perplexity" in capsys.readouterr().out
    rc = main(["-q", "eval", "--model", "tiny:opt", "--data", str(data), "--seqlen", "128",
               "--max-windows", "3", "--json", str(js)])
    fp = json.loads(js.read_text())
    assert rc == 0 and fp["method"] == "fp32" and fp["ppl"] != res["ppl"] and fp["config"] is None
    assert fp["ppl"] == pytest.approx(res["reference_ppl"], rel=1e-9)  # the source, untouched by compile
    assert "ppl_stderr" in fp and "kld_mean" not in fp


def test_bad_values_exit_2_with_a_message(capsys):
    assert main(["compile", "--model", "tiny:llama", "--wbits", "9"]) == 2
    assert "wbits=9 is not allowed" in capsys.readouterr().err
    assert main(["compile", "--model", "tiny:llama", "--wbits", "4", "--abits", "12"]) == 2
    assert "abits=12" in capsys.readouterr().err
    assert main(["compile", "--model", "tiny:bert", "--wbits", "4"]) == 2
    assert "'bert'" in capsys.readouterr().err
    assert main(["compile", "tiny:llama", "--model", "tiny:opt"]) == 2
    assert "two models given: 'tiny:llama' and --model 'tiny:opt'" in capsys.readouterr().err


def test_parse_override():
    assert parse_override("mlp\\.down_proj:wbits=8,abits=16,symmetric=true") == (
        "mlp\\.down_proj", {"wbits": 8, "abits": 16, "symmetric": True})
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="PATTERN:key=value"):
        parse_override("down_proj")


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "abqc")
    r = subprocess.run([exe, "compile", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dump-ir" in r.stdout and "--abq-options" in r.stdout


def test_compile_with_a_calibrated_method(tmp_path, capsys):
    out = tmp_path / "ir"
    rc = main(["-q", "compile", "--model", "tiny:llama", "--wbits", "3", "--method", "quantease",
               "--solver", "sweeps=3", "--solver", "act_order=true", "--nsamples", "4",
               "--calib-seqlen", "32", "--dump-ir", str(out)])
    assert rc == 0
    assert "002_Calibrate.txt" in {p.name for p in out.iterdir()}
    assert "compiled W3A16 quantease: " in capsys.readouterr().out
    assert main(["compile", "--model", "tiny:llama", "--wbits", "3", "--method", "gptq",
                 "--solver", "sweps=3"]) == 2
    assert "unknown solver option(s) ['sweps']" in capsys.readouterr().err


def test_tune_and_show(tmp_path, capsys):
    log = tmp_path / "t.jsonl"
    assert main(["-q", "tune", "--shapes", "40x70", "--bits", "W2A3,W3A16", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "|m1|n40|k70|w2|a3|g0" in out and "|w3|a16|" in out
    assert main(["tune", "--show", "--log", str(log)]) == 0
    shown = capsys.readouterr().out
    assert shown.splitlines()[0].split()[:2] == ["key", "formulation"] and len(shown.splitlines()) == 3
    assert main(["tune", "--bits", "W9A8", "--log", str(log)]) == 2
    assert "W9A8 is not allowed" in capsys.readouterr().err
    assert main(["tune", "--shapes", "40by70", "--log", str(log)]) == 2
    assert "shapes '40by70'" in capsys.readouterr().err


def test_compile_out_then_generate_and_eval_the_saved_model(tmp_path, capsys):
    out = tmp_path / "w4a8"
    assert main(["-q", "compile", "--model", "tiny:llama", "--wbits", "4", "--abits", "8",
                 "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["-q", "generate", str(out), "hello", "--max-new-tokens", "5"]) == 0
    got = capsys.readouterr()
    text = got.out.strip()
    assert text.startswith("hello") and len(text) > len("hello")
    assert re.search(r"5 new tokens in [0-9.]+s: [0-9.]+ tokens/s", got.err)
    # the same greedy text from the model compiled on the fly
    assert main(["-q", "generate", "tiny:llama", "hello", "--max-new-tokens", "5",
                 "--wbits", "4", "--abits", "8"]) == 0
    assert capsys.readouterr().out.strip() == text
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    assert main(["-q", "eval", "--model", str(out), "--data", str(data), "--seqlen", "64"]) == 0
    saved = json.loads(capsys.readouterr().out.splitlines()[0])
    assert main(["-q", "eval", "--model", "tiny:llama", "--wbits", "4", "--abits", "8",
                 "--data", str(data), "--seqlen", "64"]) == 0
    fresh = json.loads(capsys.readouterr().out.splitlines()[0])
    assert saved["ppl"] == pytest.approx(fresh["ppl"], rel=1e-6)
    assert saved["method"] == "saved abqc model"


def test_abq_bit_balance_compile_out_then_eval_and_reproduce(tmp_path, capsys):
    """The issue's check: --scheme W2*A8 --method abq --out d, then eval d (no recompile),
    with the KL divergence against the float source; d/recipe.json compiles the same bytes."""
    d = tmp_path / "d"
    calib = ["--abq-options", '{"epochs": 1}', "--nsamples", "4", "--calib-seqlen", "32"]
    assert main(["-q", "compile", "tiny:llama", "--scheme", "W2*A8", "--method", "abq", *calib,
                 "--out", str(d)]) == 0
    assert "compiled W2*A8 abq: 14/15 linears quantized" in capsys.readouterr().out
    recipe = json.loads((d / "recipe.json").read_text())
    assert recipe["model"] == "tiny:llama" and recipe["wbits"] == "2*" and recipe["method"] == "abq"
    assert recipe["abq_options"] == {"epochs": 1} and recipe["nsamples"] == 4

    data = tmp_path / "t.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30, encoding="utf-8")
    js = tmp_path / "r.json"
    import abqc.capture

    real_capture = abqc.capture.capture
    calls = []
    abqc.capture.capture = lambda *a, **k: calls.append(1) or real_capture(*a, **k)
    try:
        assert main(["-q", "eval", str(d), "--data", str(data), "--seqlen", "64", "--max-windows", "4",
                     "--reference", "source", "--json", str(js)]) == 0
    finally:
        abqc.capture.capture = real_capture
    assert not calls, "eval of a saved model ran torch.export"
    res = json.loads(js.read_text())
    assert res["config"]["wbits"] == "2*" and res["config"]["method"] == "abq"
    assert res["abqc_version"] == abqc.__version__ and res["reference"] == "tiny:llama"
    assert res["ppl_stderr"] > 0 and 0 < res["kld_mean"] < 5 and 0 < res["same_top_p"] <= 1
    assert res["reference_ppl"] != res["ppl"]
    assert "KLD" in capsys.readouterr().out
    assert main(["-q", "eval", str(d), "--wbits", "4", "--data", str(data)]) == 2
    assert "already compiled" in capsys.readouterr().err

    d2 = tmp_path / "d2"
    assert main(["-q", "compile", "--recipe", str(d / "recipe.json"), "--out", str(d2)]) == 0
    assert (d2 / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    assert main(["-q", "compile", "--recipe", str(d / "recipe.json"), "--out", str(d2)]) == 2
    assert "not empty" in capsys.readouterr().err  # an existing model is not replaced silently
