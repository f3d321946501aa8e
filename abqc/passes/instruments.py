"""Instruments that watch a pipeline: print the IR, dump it per pass, time passes."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from torch.fx import GraphModule

from ..atomic import write_text
from ..ir import format_graph
from .base import Pass, PassInstrument

log = logging.getLogger("abqc")


class PrintIR(PassInstrument):
    """Print the IR after each pass (to stdout, or `stream`)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def run_after_pass(self, gm: GraphModule, p: Pass, index: int) -> None:
        print(format_graph(gm, f"after {index:03d}_{p.name}"), file=self.stream or sys.stdout)


class DumpIR(PassInstrument):
    """Write one readable file per pass: ``<dir>/003_QuantDequantFusion.txt``.

    The graph before the first pass goes to ``<dir>/input.txt``. Each file is written
    to a temporary name and renamed, so a dump is never half-written.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._first = True

    def _write(self, name: str, text: str) -> None:
        write_text(self.directory / name, text)

    def run_before_pass(self, gm: GraphModule, p: Pass, index: int) -> None:
        if self._first:
            self._first = False
            self._write("input.txt", format_graph(gm, "input (captured graph)"))

    def run_after_pass(self, gm: GraphModule, p: Pass, index: int) -> None:
        self._write(f"{index:03d}_{p.name}.txt", format_graph(gm, f"after {index:03d}_{p.name}\n# {p!r}"))


class PassTimings(PassInstrument):
    """Record each pass's wall time; `report()` gives a table."""

    def __init__(self):
        self.records: list[tuple[int, str, float]] = []
        self._t0 = 0.0

    def run_before_pass(self, gm: GraphModule, p: Pass, index: int) -> None:
        self._t0 = time.perf_counter()

    def run_after_pass(self, gm: GraphModule, p: Pass, index: int) -> None:
        dt = time.perf_counter() - self._t0
        self.records.append((index, p.name, dt))
        log.info("pass %03d %-22s %.2fs", index, p.name, dt)

    def report(self) -> str:
        lines = [f"{i:03d} {name:<24} {dt:8.3f}s" for i, name, dt in self.records]
        total = sum(dt for *_, dt in self.records)
        return "\n".join(lines + [f"{'total':<28} {total:8.3f}s"])
