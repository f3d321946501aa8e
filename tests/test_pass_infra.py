"""Pass infrastructure: Sequential, PassContext instruments, dumps, timings, pipelines."""
import io

import pytest
import torch

from abqc.config import CompileConfig
from abqc.errors import ConfigError
from abqc.passes import (DumpIR, Pass, PassContext, PassInstrument, PassTimings, PrintIR,
                         Sequential, pipeline)


class Tag(Pass):
    """Appends its tag to gm.meta['trail'] (a pass with an observable effect)."""

    def __init__(self, tag):
        self.tag = tag

    def transform(self, gm):
        gm.meta.setdefault("trail", []).append(self.tag)
        return gm


class Recorder(PassInstrument):
    def __init__(self):
        self.events = []

    def enter_pass_ctx(self, ctx):
        self.events.append("enter")

    def exit_pass_ctx(self, ctx):
        self.events.append("exit")

    def run_before_pass(self, gm, p, index):
        self.events.append(("before", index, p.name))

    def run_after_pass(self, gm, p, index):
        self.events.append(("after", index, p.name))


def test_sequential_runs_in_order_and_instruments_see_leaf_passes(toy):
    _, gm, _ = toy
    rec = Recorder()
    seq = Sequential([Tag("a"), Sequential([Tag("b"), Tag("c")], name="inner"), Tag("d")])
    with PassContext([rec]):
        gm = seq(gm)
    assert gm.meta["trail"] == ["a", "b", "c", "d"]
    assert rec.events[0] == "enter" and rec.events[-1] == "exit"
    afters = [e for e in rec.events if e[0] == "after"]
    assert [i for _, i, _ in afters] == [0, 1, 2, 3]
    assert all(name == "Tag" for *_, name in afters)


def test_context_state_and_nesting():
    outer = PassContext(config="x")
    with outer:
        assert PassContext.current() is outer and PassContext.current().config == "x"
        with PassContext() as inner:
            assert PassContext.current() is inner
        assert PassContext.current() is outer
    assert PassContext.current() is not outer


def test_dump_print_and_timing_instruments(toy, tmp_path):
    _, gm, _ = toy
    out = io.StringIO()
    timings = PassTimings()
    with torch.no_grad(), PassContext([DumpIR(tmp_path), PrintIR(out), timings]):
        pipeline("rtn", CompileConfig(wbits=4, abits=8))(gm)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_AnnotateQuant.txt", "001_InsertQuantDequant.txt",
                     "002_RoundToNearest.txt", "003_QuantDequantFusion.txt",
                     "004_LowerToKernels.txt", "input.txt"]
    assert "abqc.quantize" not in (tmp_path / "000_AnnotateQuant.txt").read_text()
    after_insert = (tmp_path / "001_InsertQuantDequant.txt").read_text()
    assert "abqc.quantize" in after_insert and "fc1" in after_insert
    assert "abqc.quantize" not in (tmp_path / "003_QuantDequantFusion.txt").read_text()
    assert "abqc.fake_quant" in (tmp_path / "003_QuantDequantFusion.txt").read_text()
    lowered = (tmp_path / "004_LowerToKernels.txt").read_text()
    assert lowered.count("abqc.qlinear(") == 3 and "abqc.fake_quant" not in lowered
    assert out.getvalue().count("# after ") == 5
    assert [name for _, name, _ in timings.records] == ["AnnotateQuant", "InsertQuantDequant",
                                                      "RoundToNearest", "QuantDequantFusion",
                                                      "LowerToKernels"]
    assert all(dt >= 0 for *_, dt in timings.records) and "total" in timings.report()


def test_pipeline_registry():
    seq = pipeline("rtn")
    assert [p.name for p in seq.passes] == ["AnnotateQuant", "InsertQuantDequant",
                                            "RoundToNearest", "QuantDequantFusion",
                                            "LowerToKernels"]
    assert [p.name for p in pipeline("rtn", CompileConfig(backend="fake_quant")).passes][-1] == \
        "QuantDequantFusion"
    assert "AnnotateQuant" in repr(seq)
    with pytest.raises(ConfigError, match="'nope'.*known pipelines"):
        pipeline("nope")
