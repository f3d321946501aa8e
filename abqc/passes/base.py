"""Pass infrastructure in the style of TVM's: small named passes, `Sequential` pipelines,
a typed `PassContext` whose instruments watch every pass run, and explicit contracts.

A pass is a class with one method, ``transform(gm) -> gm``, and three declarations in the
spirit of torch.fx's ``PassBase.requires/ensures``:

- ``requires``: facts (`abqc.facts`) that must be on the program before it runs;
- ``ensures``: facts it attaches (checked after it runs: a pass cannot claim what it did
  not do);
- ``before``: facts that must *not* be there yet (smoothing after weights were rounded to
  codes would silently do nothing useful, so `Smooth` declares ``before = (WeightCodes,)``);
- ``consumes``: facts it removes (``DownProjCompensation("fold")`` consumes `Compensation`).

`Sequential` checks the whole pipeline against the facts the program starts with before
running any pass, so a missing or misordered pass is refused with a message naming it.
Calling a pass runs it under the current `PassContext`: instruments are told before and
after (print the IR, dump it, time it), and the graph is linted and recompiled.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from torch.fx import GraphModule

from ..errors import ConfigError
from ..facts import Fact, facts

_local = threading.local()


class PassInstrument:
    """Watches passes. Override any of the hooks; all are no-ops here."""

    def enter_pass_ctx(self, ctx: "PassContext") -> None: ...

    def exit_pass_ctx(self, ctx: "PassContext") -> None: ...

    def run_before_pass(self, gm: GraphModule, p: "Pass", index: int) -> None: ...

    def run_after_pass(self, gm: GraphModule, p: "Pass", index: int) -> None: ...


@dataclass
class PassContext:
    """The inputs shared by the passes of one compilation, and the instruments watching them.

    ``with PassContext([DumpIR(d)], config=cfg, calib=data, tokenizer=tok): pipeline(gm)``.
    Passes read them from ``PassContext.current()``: `config` (the `CompileConfig`), `calib`
    (texts or a LongTensor of token windows) and `tokenizer`. The model itself is not here:
    the program (graph + `Source` fact) is the only store of its tensors.
    """

    instruments: Sequence[PassInstrument] = ()
    config: Any = None
    calib: Any = None
    tokenizer: Any = None

    def __post_init__(self):
        self.instruments = list(self.instruments)
        self.pass_count = 0  # numbers leaf passes in run order (000, 001, ...)
        self._windows = None

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

    def require_config(self, who: str):
        if self.config is None:
            raise ConfigError(f"{who} needs a CompileConfig in the PassContext "
                              "(PassContext(config=...))")
        return self.config


def _names(kinds: Iterable[type[Fact]]) -> str:
    return ", ".join(k.fact_name() for k in kinds)


class Pass:
    """A named graph-to-graph step. Subclasses implement `transform` and declare contracts."""

    requires: tuple[type[Fact], ...] = ()
    ensures: tuple[type[Fact], ...] = ()
    before: tuple[type[Fact], ...] = ()
    consumes: tuple[type[Fact], ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def transform(self, gm: GraphModule) -> GraphModule:
        raise NotImplementedError

    def check(self, present: set[type[Fact]]) -> set[type[Fact]]:
        """The facts after this pass, given those before; `ConfigError` if it cannot run."""
        missing = [k for k in self.requires if k not in present]
        if missing:
            raise ConfigError(f"pass {self.name} requires {_names(missing)}, which no earlier "
                              f"pass ensures (present: {_names(present) or 'none'}); add the pass "
                              "that provides it before this one")
        early = [k for k in self.before if k in present]
        if early:
            raise ConfigError(f"pass {self.name} must run before any pass that ensures "
                              f"{_names(early)}; move it earlier in the pipeline")
        return (present - set(self.consumes)) | set(self.ensures)

    def __call__(self, gm: GraphModule) -> GraphModule:
        store = facts(gm)
        self.check({type(f) for f in store})
        ctx = PassContext.current()
        index = ctx.pass_count
        ctx.pass_count += 1
        for inst in ctx.instruments:
            inst.run_before_pass(gm, self, index)
        gm = self.transform(gm)
        gm.graph.lint()
        gm.recompile()
        store = facts(gm)
        broken = [k for k in self.ensures if k not in store]
        if broken:
            raise AssertionError(f"pass {self.name} declares it ensures {_names(broken)} "
                                 "but did not attach it")
        for inst in ctx.instruments:
            inst.run_after_pass(gm, self, index)
        return gm

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({args})"


class Sequential(Pass):
    """Runs passes in order; instruments see each inner pass, not the sequence itself.
    The whole sequence's contracts are checked before the first pass runs."""

    def __init__(self, passes: Iterable[Pass], name: str | None = None):
        self.passes = list(passes)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or "Sequential"

    def check(self, present: set[type[Fact]]) -> set[type[Fact]]:
        for i, p in enumerate(self.passes):
            try:
                present = p.check(present)
            except ConfigError as e:
                raise ConfigError(f"pipeline {self.name!r}, pass {i}: {e}") from None
        return present

    def __call__(self, gm: GraphModule) -> GraphModule:
        self.check({type(f) for f in facts(gm)})
        for p in self.passes:
            gm = p(gm)
        return gm

    def __repr__(self) -> str:
        inner = "\n".join(f"  {i}: {p!r}" for i, p in enumerate(self.passes))
        return f"{self.name}[\n{inner}\n]"
