"""The catalogue of bad inputs and faults (issue 21): each gives a clear error naming the
value, or a recovery with a warning; nothing abqc did not write is destroyed, nothing
damaged is trusted, nothing wrong is silent. Risky cases (SIGKILL, garbage shared objects,
fuzzed files) run in subprocesses."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import abqc
from abqc.errors import AbqcWarning, ConfigError, UnsupportedModelError
from abqc.runtime.manifest import MANIFEST, CorruptCheckpointError, write_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cm(tiny_models):
    return abqc.compile(tiny_models["llama"], wbits=4, abits=8)


@pytest.fixture(scope="module")
def saved(cm, tmp_path_factory):
    return cm.save(tmp_path_factory.mktemp("bad") / "q")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- data loss and half-written state ------------------------------------------------------

def test_save_refuses_what_it_did_not_write_unless_overwrite(cm, saved, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine is not empty.*notes.txt.*overwrite=True"):
        cm.save(d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="file is a file.*overwrite=True"):
        cm.save(f)
    assert f.read_text() == "x"
    # overwrite=True replaces abqc's files and keeps the others, by hard link (same file)
    ino = (d / "notes.txt").stat().st_ino
    cm.save(d, overwrite=True)
    assert (d / "notes.txt").read_text() == "keep me" and (d / "notes.txt").stat().st_ino == ino
    assert (d / MANIFEST).is_file() and "notes.txt" not in json.loads((d / MANIFEST).read_text())["files"]
    torch.testing.assert_close(abqc.load(d)(torch.tensor([[1, 2, 3]])).logits,
                               cm(torch.tensor([[1, 2, 3]])).logits, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]  # nothing left beside
    # a foreign file a loader would read beside the model is refused even with overwrite
    (d / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(FileExistsError, match="pytorch_model.bin"):
        cm.save(d, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cm.save(empty) == empty and (empty / "config.json").is_file()


def test_save_into_the_current_directory_is_a_clear_error(cm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for where in (".", "", str(tmp_path.parent)):
        with pytest.raises(ConfigError, match="directory=") as e:
            cm.save(where)
        assert repr(where)[1:-1] in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_the_old_model_and_nothing_else(cm, saved, tmp_path, monkeypatch):
    out = _copy(saved, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from abqc.runtime import save as save_mod

    def boom(d):
        raise OSError("disk full (test)")

    monkeypatch.setattr(save_mod, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        cm.save(out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


_KILL = textwrap.dedent("""
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
    atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)
    target, stage = sys.argv[2], sys.argv[3]
    tmp = atomic.staging_dir(target)
    for name in ("config.json", "model.safetensors"):
        open(os.path.join(tmp, name), "w").write("new " + name)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if stage == "before_commit":
        die()
    if stage == "after_exchange":
        atomic._remove = die
    if stage == "mid_write":
        open(os.path.join(tmp, "model.safetensors"), "w").write("half")
        die()
    atomic.commit_dir(tmp, target, keep=["notes.txt"])
""")


@pytest.mark.parametrize("stage", ["mid_write", "before_commit", "after_exchange"])
def test_a_killed_save_leaves_the_old_or_the_new_directory_whole(tmp_path, stage):
    target = tmp_path / "m"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).write_text("old " + name)
    (target / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-c", _KILL, str(ROOT / "abqc" / "atomic.py"), str(target),
                        stage], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    got = {p.name: p.read_text() for p in target.iterdir()}
    want = "old" if stage != "after_exchange" else "new"
    assert got == {"config.json": f"{want} config.json", "model.safetensors": f"{want} model.safetensors",
                   "notes.txt": "mine"}
    from abqc.atomic import clean_stale

    clean_stale(target)  # (what the next save does first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (target / "notes.txt").exists()


_WRITER = textwrap.dedent("""
    import sys, types
    for name, sub in (("abqc", ""), ("abqc.codegen", "/codegen")):
        m = types.ModuleType(name); m.__path__ = [sys.argv[1] + sub]; sys.modules[name] = m
    from abqc.codegen.tuning_log import TuningLog
    log = TuningLog(sys.argv[2])
    for i in range(int(sys.argv[4])):
        log.add({"key": f"cpu|m1|k{i % 7}", "formulation": "unpack", "params": {"n_tile": 16},
                 "ms": 1.0 + i, "writer": sys.argv[3], "i": i, "date": ""})
""")


def test_two_concurrent_tuning_writers_lose_no_record(tmp_path):
    path = tmp_path / "kernels.jsonl"
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(ROOT / "abqc"), str(path), w, str(n)])
             for w in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted((r["writer"], r["i"]) for r in lines) == sorted((w, i) for w in "ab" for i in range(n))
    from abqc.codegen.tuning_log import TuningLog

    assert set(TuningLog(path).records) == {f"cpu|m1|k{j}" for j in range(7)}


# -- trust boundaries ----------------------------------------------------------------------

def _qc_edit(d: Path, edit, reseal: bool):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    if reseal:
        write_manifest(d)


def test_the_manifest_covers_config_json_and_every_file(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    d = _copy(saved, tmp_path / "q")
    path = "model.layers.0.mlp.down_proj"
    _qc_edit(d, lambda qc: qc["layers"][path].update(abits=4), reseal=False)
    with pytest.raises(CorruptCheckpointError, match="config.json (has|does not match)"):
        abqc.load(d)
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        AutoModelForCausalLM.from_pretrained(d)
    (d / MANIFEST).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"has no {MANIFEST}"):
        abqc.load(d)


def test_a_format_that_no_longer_matches_its_tensors_is_refused_naming_the_field(saved, tmp_path):
    path = "model.layers.0.mlp.down_proj"
    d = _copy(saved, tmp_path / "a")
    _qc_edit(d, lambda qc: qc["layers"][path].update(wbits=3), reseal=True)
    with pytest.raises(CorruptCheckpointError, match=rf"layers\['{path}'\].wbits=3 does not match"):
        abqc.load(d)
    d = _copy(saved, tmp_path / "b")

    def wider(qc):  # edited consistently (and resealed): only the packed shapes can tell
        spec = qc["layers"][path]
        spec["format"] = spec["format"].replace("w=4", "w=8")
        spec["wbits"] = spec["weights"]["num_bits"] = 8
    _qc_edit(d, wider, reseal=True)
    with pytest.raises(CorruptCheckpointError, match=rf"{path}.weight_packed is stored as .* w \(wbits\)"):
        abqc.load(d)


@pytest.mark.parametrize("name, why", [
    ("../../etc/hostname", "leaves the model directory"), ("/etc/hostname", "absolute path"),
    ("/dev/zero", "absolute path"), ("zero", "not a regular file")])
def test_manifest_names_stay_inside_the_directory(saved, tmp_path, name, why):
    d = _copy(saved, tmp_path / "q")
    if name == "zero":
        os.symlink("/dev/zero", d / "zero")
    m = json.loads((d / MANIFEST).read_text())
    m["files"][name] = {"size": 10, "sha256": "0" * 64}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptCheckpointError, match=why) as e:
        abqc.load(d)
    assert name.split("/")[-1] in str(e.value)


def test_unlisted_files_a_loader_would_read_are_refused(saved, tmp_path):
    d = _copy(saved, tmp_path / "q")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CorruptCheckpointError, match="pytorch_model.bin is not in the model's manifest"):
        abqc.load(d)
    (d / "pytorch_model.bin").unlink()
    (d / "README.md").write_text("fine")
    assert abqc.load(d) is not None


def test_a_bad_cached_kernel_is_rebuilt_with_a_warning_never_loaded(tmp_path, monkeypatch, caplog):
    from abqc.codegen import tuning
    from abqc.codegen.compute import KernelShape

    monkeypatch.setenv("ABQC_CACHE", str(tmp_path))
    shape = KernelShape(16, 64, 4, 16, 0)
    params = tuning.default_unpack_params(1)
    tuning.load_or_build(shape, 1, "unpack", params)
    so = tuning._kernel_path(tuning.tuning_key(shape, 1), "unpack", params)
    good = so.read_bytes()
    for damage in (good[: len(good) // 3], b"\x7fELF garbage" * 10, None):
        if damage is None:
            so.with_name(so.name + ".sha256").unlink()
        else:
            so.write_bytes(damage)
        caplog.clear()
        with caplog.at_level("WARNING", logger="abqc"):
            k = tuning.load_or_build(shape, 1, "unpack", params)
        assert f"cached kernel {so} is not loaded" in caplog.text and "rebuilding" in caplog.text
        assert tuning.cached_kernel_ok(so) is None and k.formulation == "unpack"


@pytest.mark.parametrize("line, why", [
    ('{"key": "k", "formulation": "unpack", "params": {"n_tile": 0}, "ms": 1}', "params.n_tile=0"),
    ('{"key": "k", "formulation": "unpack", "params": {"n_tile": -16}, "ms": 1}', "params.n_tile=-16"),
    ('{"key": "k", "formulation": "unpack", "params": {}, "ms": 0}', "ms=0"),
    ('{"key": "k", "formulation": "unpack", "params": {}, "ms": NaN}', "ms=nan"),
    ('{"key": "k", "formulation": "../x", "params": {}, "ms": 1}', "formulation='../x'"),
    ('{"key": "k", "formulation": "unpack", "params": {}, "ms": 1, "candidates": [{"formulation": '
     '"lut", "params": {}, "ms": -1}]}', "candidates[0].ms=-1"),
    (b'{"key": "k\xff"}', "not UTF-8"), ("[1, 2]", "not a record")])
def test_bad_tuning_records_are_skipped_naming_file_and_line(tmp_path, caplog, line, why):
    from abqc.codegen.tuning_log import TuningLog

    path = tmp_path / "kernels.jsonl"
    good = b'{"key": "g", "formulation": "unpack", "params": {"n_tile": 16}, "ms": 1}\n'
    path.write_bytes(good + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with caplog.at_level("WARNING", logger="abqc"):
        log = TuningLog(path)
    assert set(log.records) == {"g"}
    assert f"{path} line 2" in caplog.text and why in caplog.text
    with pytest.raises(ConfigError, match="ms=0"):
        log.add({"key": "z", "formulation": "unpack", "params": {}, "ms": 0})


# -- silent wrong results ------------------------------------------------------------------

def test_non_finite_weights_are_refused_naming_the_linear_and_count():
    from frontends.tiny import tiny_model

    m = tiny_model("llama", seed=0)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, :3] = float("nan")
        m.model.layers[0].self_attn.q_proj.weight[2, 5] = float("inf")
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.self_attn.q_proj.weight \(1 of "
                                                    r"\d+\), model.layers.1.mlp.up_proj.weight \(3 of"):
        abqc.compile(m, wbits=4, abits=8)


@pytest.mark.parametrize("formulation, abits", [("unpack", 8), ("bitserial", 8), ("lut", 4),
                                                ("vnni", 8), ("unpack", 16)])
def test_nan_and_inf_activations_give_nan_rows_as_the_reference(formulation, abits):
    from abqc.codegen.vnni import vnni_supported
    from abqc.runtime.format import QuantFormat
    from abqc.runtime.qlinear import QuantLinear
    from abqc.runtime.reference import FakeQuantLinear

    if formulation == "vnni" and not vnni_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    g = torch.Generator().manual_seed(0)
    fmt = QuantFormat(n=24, k=128, wbits=4, abits=abits, formulation=formulation)
    q = QuantLinear.from_codes(fmt, torch.randint(0, 16, (24, 128), generator=g).to(torch.uint8),
                               torch.rand(24, 1, generator=g) + 0.1, torch.full((24, 1), 7.0),
                               bias=torch.randn(24, generator=g))
    x = torch.randn(4, 128, generator=g)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    y, ref = q(x), FakeQuantLinear(q)(x)
    assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()
    if abits == 16:  # float activations: an infinity stays an infinity, as in the float model
        assert not torch.isfinite(y[2]).any() and not torch.isfinite(ref[2]).any()
    else:  # a quantized row with an infinity has an infinite scale: NaN, as the reference
        assert torch.isnan(y[2]).all() and torch.isnan(ref[2]).all()
    assert torch.isfinite(y[[0, 3]]).all()
    assert torch.isnan(q(x[1:2])).all() and not torch.isfinite(q(x[2:3])).any()  # one-token path
    assert torch.equal(q(x[0:1]), y[0:1])


def test_labels_give_the_transformers_loss_and_inputs_embeds_is_refused(cm, ids):
    out = cm(ids, labels=ids)
    want = cm.hf_model(ids, labels=ids).loss
    assert out.loss is not None and out.loss.dim() == 0
    torch.testing.assert_close(out.loss, want)
    masked = ids.clone()
    masked[:, :10] = -100
    torch.testing.assert_close(cm(ids, labels=masked).loss, cm.hf_model(ids, labels=masked).loss)
    with pytest.raises(NotImplementedError, match="inputs_embeds is not supported.*hf_model"):
        cm(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['output_hidden_states'\]"):
        cm(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="labels must be .* shaped like input_ids"):
        cm(ids, labels=ids[:, :3])


def test_options_that_match_nothing_and_fallbacks_warn_or_fail_when_strict(tiny_models, monkeypatch):
    m = tiny_models["llama"]
    with pytest.warns(AbqcWarning, match="overrides pattern 'dwon_proj' matches no linear"):
        abqc.compile(m, wbits=4, overrides={"dwon_proj": {"wbits": 8}}, backend="fake_quant")
    with pytest.raises(ConfigError, match="exclude pattern 'nothing_here' matches no linear.*strict"):
        abqc.compile(m, wbits=4, exclude=("nothing_here",), strict=True)
    from abqc.passes import lower

    real = lower.LowerToKernels._lower

    def refuse(self, gm, lin, ann, path):
        if path.endswith("layers.1.mlp.up_proj"):
            raise lower.NotLowerable("no kernel for this test")
        return real(self, gm, lin, ann, path)

    monkeypatch.setattr(lower.LowerToKernels, "_lower", refuse)
    with pytest.warns(AbqcWarning, match="model.layers.1.mlp.up_proj: no kernel for this test"):
        abqc.compile(m, wbits=4)
    with pytest.raises(ConfigError, match="model.layers.1.mlp.up_proj: no kernel for this test"):
        abqc.compile(m, wbits=4, strict=True)


# -- errors from deep inside instead of a clear one ----------------------------------------

@pytest.mark.parametrize("options, value", [
    ({"wbits": 4.0}, "wbits=4.0"), ({"abits": 8.0}, "abits=8.0"), ({"wbits": "4"}, "wbits='4'"),
    ({"symmetric": "yes"}, "symmetric='yes'"), ({"strict": 1}, "strict=1"),
    ({"tune": "no"}, "tune='no'"), ({"max_seq_len": 0}, "max_seq_len=0"),
    ({"exclude": [3]}, "module pattern 3"), ({"overrides": ["down_proj"]}, "overrides=['down_proj']"),
    ({"seed": 1.5}, "seed=1.5")])
def test_bad_option_values_name_the_value(options, value):
    with pytest.raises(ConfigError) as e:
        abqc.CompileConfig.from_options(**options)
    assert value in str(e.value)


@pytest.mark.parametrize("ids, err, match", [
    (torch.zeros(1, 0, dtype=torch.long), ValueError, r"shape \(1, 0\): it is empty"),
    (torch.arange(5), ValueError, r"shape \(5,\); pass a 2-D.*ids\[None\]"),
    (torch.zeros(1, 3), TypeError, "dtype torch.float32"),
    (torch.tensor([[1, 2, 300]]), ValueError, r"token id 300, outside the vocabulary \[0, 260\)"),
    (torch.tensor([[1, -2]]), ValueError, "token id -2"),
    (torch.zeros(65, 2, dtype=torch.long), ValueError, "batch 65"),
    ([[1, 2]], TypeError, "got list")])
def test_bad_input_ids_name_the_value(cm, ids, err, match):
    with pytest.raises(err, match=match):
        cm(ids)
    if not (isinstance(ids, torch.Tensor) and ids.shape[0] == 65):
        with pytest.raises(err, match=match):
            cm.generate(ids, max_new_tokens=1)


def test_a_model_on_the_meta_device_is_refused():
    from frontends.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(UnsupportedModelError, match=r"tensors on the meta device \(e.g. 'model\."):
        abqc.compile(m, wbits=4)


def test_a_non_utf8_calibration_file_names_the_file(tmp_path):
    from frontends import corpus

    f = tmp_path / "calib.txt"
    f.write_bytes(b"good text \xff\xfe bad")
    with pytest.raises(ConfigError, match=r"calib.txt' is not UTF-8 .* at byte 10"):
        corpus.load_text(str(f))


def test_load_of_a_bad_path_names_it(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        abqc.load(tmp_path / "nope")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="config.json is not UTF-8"):
        abqc.load(tmp_path)


# -- fuzz: random bytes and truncations never crash the process ----------------------------

_FUZZ = textwrap.dedent("""
    import json, os, random, shutil, sys, logging
    logging.disable(logging.CRITICAL)
    import abqc
    from abqc.codegen import tuning
    from abqc.codegen.compute import KernelShape
    from abqc.codegen.tuning_log import TuningLog
    from abqc.runtime.manifest import write_manifest
    src, work = sys.argv[1], sys.argv[2]
    rnd = random.Random(0)
    seen = {}
    def mutate(data):
        kind = rnd.choice(["truncate", "flip", "random", "splice"])
        if kind == "truncate" or not data:
            return data[: rnd.randrange(len(data) + 1)]
        if kind == "flip":
            b = bytearray(data)
            for _ in range(rnd.randint(1, 8)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            return bytes(b)
        if kind == "random":
            return os.urandom(rnd.randint(0, 300))
        i = rnd.randrange(len(data))
        return data[:i] + os.urandom(rnd.randint(1, 40)) + data[i:]
    for trial in range(int(sys.argv[3])):
        d = os.path.join(work, f"m{trial}")
        shutil.copytree(src, d)
        name = rnd.choice(["config.json", "abqc_manifest.json", "model.safetensors"])
        p = os.path.join(d, name)
        data = open(p, "rb").read()
        open(p, "wb").write(mutate(data) if name != "model.safetensors" else
                            data[:8] + mutate(data[8:200]) + data[200:] if rnd.random() < 0.5 else mutate(data))
        if name != "abqc_manifest.json" and rnd.random() < 0.5:
            write_manifest(d)  # resealed: the checks behind the manifest must hold on their own
        try:
            abqc.load(d)
            r = "loaded"
        except Exception as e:
            r = type(e).__name__
        seen[r] = seen.get(r, 0) + 1
        shutil.rmtree(d)
    logp = os.path.join(work, "log.jsonl")
    good = json.dumps({"key": "g", "formulation": "unpack", "params": {"n_tile": 16}, "ms": 1.0})
    for trial in range(200):
        lines = [mutate(good.encode()) for _ in range(5)] + [good.encode()]
        open(logp, "wb").write(b"\\n".join(lines) + b"\\n")
        assert "g" in TuningLog(logp).records
    os.environ["ABQC_CACHE"] = os.path.join(work, "cache")
    shape = KernelShape(16, 64, 4, 16, 0)
    params = tuning.default_unpack_params(1)
    tuning.load_or_build(shape, 1, "unpack", params)
    so = tuning._kernel_path(tuning.tuning_key(shape, 1), "unpack", params)
    good_so = open(so, "rb").read()
    for trial in range(3):
        open(so, "wb").write(mutate(good_so))
        tuning.load_or_build(shape, 1, "unpack", params)
        assert tuning.cached_kernel_ok(so) is None
    print(json.dumps(seen))
""")


def test_fuzzed_models_logs_and_kernels_never_crash_the_process(saved, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _FUZZ, str(saved), str(tmp_path), "30"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert sum(seen.values()) == 30
    # a damaged model is refused by abqc's checks, never by a crash or a stray error type
    assert set(seen) <= {"loaded", "CorruptCheckpointError", "ConfigError"}, seen
