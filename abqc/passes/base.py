"""Pass infrastructure in the style of TVM's: small named passes, `Sequential`
pipelines, and a `PassContext` whose instruments watch every pass run.

A pass is a class with one method, ``transform(gm) -> gm``. Calling a pass runs it
under the current `PassContext`: instruments are told before and after (print the IR,
dump it to a numbered file, time it), and the graph is linted and recompiled.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

from torch.fx import GraphModule

_local = threading.local()


class PassInstrument:
    """Watches passes. Override any of the hooks; all are no-ops here."""

    def enter_pass_ctx(self, ctx: "PassContext") -> None: ...

    def exit_pass_ctx(self, ctx: "PassContext") -> None: ...

    def run_before_pass(self, gm: GraphModule, p: "Pass", index: int) -> None: ...

    def run_after_pass(self, gm: GraphModule, p: "Pass", index: int) -> None: ...


class PassContext:
    """State shared by the passes of one compilation, and the instruments watching them.

    ``with PassContext(instruments=[...], config=cfg, calib=data): pipeline(gm)``.
    Passes read shared inputs (config, calibration data) from ``PassContext.current()``.
    """

    def __init__(self, instruments: Iterable[PassInstrument] = (), **state: Any):
        self.instruments = list(instruments)
        self.state = dict(state)
        self.pass_count = 0  # numbers leaf passes in run order (000, 001, ...)

    @staticmethod
    def current() -> "PassContext":
        stack = getattr(_local, "stack", None)
        if not stack:
            _local.stack = stack = [PassContext()]
        return stack[-1]

    def __enter__(self) -> "PassContext":
        if not hasattr(_local, "stack"):
            _local.stack = [PassContext()]
        _local.stack.append(self)
        for inst in self.instruments:
            inst.enter_pass_ctx(self)
        return self

    def __exit__(self, *exc) -> None:
        for inst in self.instruments:
            inst.exit_pass_ctx(self)
        _local.stack.pop()

    def get(self, key: str, default: Any = None) -> Any:
        return self.state.get(key, default)


class Pass:
    """A named graph-to-graph step. Subclasses implement `transform`."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def transform(self, gm: GraphModule) -> GraphModule:
        raise NotImplementedError

    def __call__(self, gm: GraphModule) -> GraphModule:
        ctx = PassContext.current()
        index = ctx.pass_count
        ctx.pass_count += 1
        for inst in ctx.instruments:
            inst.run_before_pass(gm, self, index)
        gm = self.transform(gm)
        gm.graph.lint()
        gm.recompile()
        for inst in ctx.instruments:
            inst.run_after_pass(gm, self, index)
        return gm

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({args})"


class Sequential(Pass):
    """Runs passes in order; instruments see each inner pass, not the sequence itself."""

    def __init__(self, passes: Iterable[Pass], name: str | None = None):
        self.passes = list(passes)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or "Sequential"

    def __call__(self, gm: GraphModule) -> GraphModule:
        for p in self.passes:
            gm = p(gm)
        return gm

    def __repr__(self) -> str:
        inner = "\n".join(f"  {i}: {p!r}" for i, p in enumerate(self.passes))
        return f"{self.name}[\n{inner}\n]"

