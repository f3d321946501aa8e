"""Tuning: the log is written, re-read, readable; known keys are never re-tuned; compiled
kernels come from the disk cache on a second run."""
import json

import pytest
import torch

from abqc.codegen import tuning
from abqc.codegen.compute import KernelShape
from abqc.codegen.kernel import pack_weight, reference
from abqc.codegen.vnni import vnni_supported
from abqc.codegen.vnni_gemm import BLOCKS as VNNI_BLOCKS
from abqc.quantizer import compute_qparams, quantize

SHAPE = KernelShape(n=24, k=130, wbits=2, abits=4)
SPACE = [("bitserial", {"order": "k_inner", "n_tile": 8, "m_outer": True}),
         ("lut", {"order": "n_inner", "n_tile": 8, "m_outer": True})]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABQC_CACHE", str(tmp_path))
    return tmp_path


def test_tuning_log_is_written_reread_and_not_retuned(cache, monkeypatch):
    rec = tuning.tune(SHAPE, 1, space=SPACE)
    path = cache / "tuning" / "kernels.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["key"] == rec["key"] == tuning.tuning_key(SHAPE, 1)
    assert {c["formulation"] for c in lines[0]["candidates"]} == {"bitserial", "lut"}
    assert rec["ms"] == min(c["ms"] for c in rec["candidates"]) and rec["tvm"].startswith("0.27")
    assert "|m1|n24|k130|w2|a4|g0" in rec["key"]

    built = []
    monkeypatch.setattr(tuning, "build", lambda *a, **k: built.append(a) or pytest.fail("re-tuned"))
    again = tuning.tune(SHAPE, 1, tuning.TuningLog())  # a fresh reader of the same file
    assert again == rec and not built
    table = tuning.TuningLog().table()
    assert rec["key"] in table and rec["formulation"] in table


def test_extend_measures_only_what_a_record_has_not_tried(cache, monkeypatch):
    """A newer abqc adds schedules: `extend` builds just those, keeps the fastest of all, and
    a second extend builds nothing."""
    first = tuning.tune(SHAPE, 1, space=SPACE)
    new = ("bitserial", {"order": "bits_inner", "n_tile": 8, "m_outer": True})
    real_build, built = tuning.build, []
    monkeypatch.setattr(tuning, "build", lambda f, s, p, *a, **k: built.append((f, p)) or real_build(f, s, p, *a, **k))
    assert tuning.tune(SHAPE, 1, tuning.TuningLog(), space=SPACE + [new]) == first  # not re-tuned
    assert built == []
    rec = tuning.tune(SHAPE, 1, tuning.TuningLog(), space=SPACE + [new], extend=True)
    assert built == [new]
    assert [(c["formulation"], c["params"]) for c in rec["candidates"]] == SPACE + [new]
    assert rec["ms"] == min(c["ms"] for c in rec["candidates"])
    assert tuning.TuningLog().get(rec["key"])["candidates"] == rec["candidates"]  # written
    tuning.tune(SHAPE, 1, tuning.TuningLog(), space=SPACE + [new], extend=True)
    assert built == [new]


def test_m_buckets_and_search_space():
    assert [tuning.m_bucket(m) for m in (1, 2, 16, 17, 500)] == [1, 16, 16, 128, 128]
    gemv = tuning.candidates(SHAPE, 1)
    gemm = tuning.candidates(SHAPE, 64)
    vnni = {"vnni"} if vnni_supported() else set()
    assert {f for f, _ in gemv} == {"bitserial", "lut", "unpack"} | vnni
    assert {f for f, _ in tuning.candidates(KernelShape(24, 130, 2, 4, 64), 1)} == \
        {"bitserial", "lut", "unpack"}  # vnni takes per-channel weights only
    integer = [c for c in gemv if c[0] in ("bitserial", "lut")]
    assert len([c for c in gemm if c[0] in ("bitserial", "lut")]) == 2 * len(integer)  # + m placement
    assert {p["decode"] for f, p in gemv if f == "unpack"} == {"inline"}
    assert {p["decode"] for f, p in gemm if f == "unpack"} == {"inline", "panel"}
    if vnni:  # register blocks of rows x tokens only where there are several tokens
        assert not [p for f, p in gemv if f == "vnni" and p.get("m_tile", 1) > 1]
        assert {(p["n_tile"], p["m_tile"]) for f, p in gemm if f == "vnni" and "m_tile" in p} == \
            set(VNNI_BLOCKS)
        assert len([p for f, p in gemv if f == "vnni"]) == 6  # GEMV: every tile x chains
        assert len([p for f, p in gemm if f == "vnni" and "m_tile" not in p]) == 1  # one GEMV
    assert {f for f, _ in tuning.candidates(KernelShape(24, 130, 4, 16), 1)} == \
        {"wo_bitserial", "wo_lut", "unpack"}


def test_packing_choice_weighs_every_bucket(cache, monkeypatch):
    """One packing serves all M: the formulation that loses least across the buckets."""
    from abqc.runtime import kernels

    log = tuning.TuningLog()
    times = {1: {"bitserial": 1.0, "unpack": 1.1}, 16: {"bitserial": 9.0, "unpack": 2.0},
             128: {"bitserial": 80.0, "unpack": 10.0}}
    for m, t in times.items():
        log.add({"key": tuning.tuning_key(SHAPE, m), "formulation": min(t, key=t.get),
                 "params": {}, "ms": min(t.values()),
                 "candidates": [{"formulation": f, "params": {}, "ms": v} for f, v in t.items()]})
    monkeypatch.setattr(kernels, "_log", lambda: log)
    assert kernels.best_formulation(SHAPE, tune_missing=False) == "unpack"
    times[1]["unpack"], times[16]["bitserial"], times[128]["bitserial"] = 1.3, 2.1, 10.5
    for m, t in times.items():
        log.add({**log.get(tuning.tuning_key(SHAPE, m)),
                 "candidates": [{"formulation": f, "params": {}, "ms": v} for f, v in t.items()]})
    # now bitserial loses 5% at M=16 and M=128 but wins 30% at M=1: the mean favours it
    assert kernels.best_formulation(SHAPE, tune_missing=False) == "bitserial"


def test_second_run_loads_compiled_kernel_from_disk(cache, monkeypatch):
    tuning.tune(SHAPE, 3, space=SPACE[:1])
    k1 = tuning.kernel_for(SHAPE, 3)
    assert len(list((cache / "kernels").glob("*.so"))) == 1
    monkeypatch.setattr(tuning, "build", lambda *a, **k: pytest.fail("compiled again"))
    k2 = tuning.kernel_for(SHAPE, 3)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 130, generator=g), torch.randn(3, 130, generator=g)
    s, z = compute_qparams(w, 3, False)
    codes = quantize(w, s, z, 3)
    pw = pack_weight(codes, s, z, SHAPE, "bitserial")
    y1, y2 = k1(x, pw), k2(x, pw)
    assert torch.equal(y1, y2)
    ref = reference(x, codes, s, z, SHAPE)
    assert (y2.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_corrupt_log_lines_are_skipped_with_a_warning(cache, caplog):
    path = cache / "tuning" / "kernels.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"key": "a", "formulation": "bitserial", "params": {}, "ms": 1}\n{broken\n')
    with caplog.at_level("WARNING", logger="abqc"):
        log = tuning.TuningLog()
    assert set(log.records) == {"a"} and "line 2" in caplog.text


def test_kernel_cache_is_keyed_by_the_code_generator(monkeypatch):
    """A kernel compiled by other code generator sources is not loaded from the disk cache."""
    before = tuning._kernel_path("k", "vnni", {"n_tile": 8})
    assert before == tuning._kernel_path("k", "vnni", {"n_tile": 8})
    monkeypatch.setattr(tuning, "codegen_fingerprint", lambda: "edited")
    assert tuning._kernel_path("k", "vnni", {"n_tile": 8}) != before
