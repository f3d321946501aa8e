"""Typed facts: what passes know about the program, attached to it instead of loose keys.

A compiled program is an FX graph module plus the facts passes attach to it: where it came
from (`Source`), how its linears are annotated, which smoothing pairs were folded, the
compensation nodes awaiting their fold, calibration statistics, which linears were lowered.
Each fact is a small dataclass stored once per type in ``gm.meta["abqc.facts"]``::

    facts(gm).add(SmoothPairs(pairs))
    facts(gm).get(SmoothPairs).pairs          # KeyError-free: `require` names the pass
    SmoothPairs in facts(gm)

Passes declare the facts they require and ensure (`abqc.passes.base.Pass`), so a pipeline
that would run a pass before what it needs is refused before any pass runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, TypeVar

from .errors import ConfigError

FACTS_KEY = "abqc.facts"

F = TypeVar("F", bound="Fact")


class Fact:
    """Base of every fact. Subclasses are dataclasses; their class name is their name."""

    @classmethod
    def fact_name(cls) -> str:
        return cls.__name__

    def describe(self) -> str:
        """One line for IR dumps and summaries."""
        return self.fact_name()


@dataclass
class Source(Fact):
    """The program was captured from a transformers model. `skeleton` is that model's module
    tree with every tensor on the meta device: the structure (classes, config, module paths)
    from which the transformers tree is rebuilt around the program's own tensors."""

    skeleton: Any
    max_seq_len: int
    model_type: str = ""

    def describe(self) -> str:
        return f"Source({type(self.skeleton).__name__}, model_type={self.model_type!r}, " \
               f"max_seq_len={self.max_seq_len})"


@dataclass
class Rotation(Fact):
    """The residual stream is rotated by an orthogonal Q folded into the weights (`Rotate`):
    embeddings E Q, readers W diag(g) Q (norm scales folded, norms set to 1), writers Qᵀ W."""

    kind: str = "hadamard"
    dim: int = 0
    seed: int = 0
    q: Any = None  # the [dim, dim] matrix (float64), for tests and later passes

    def describe(self) -> str:
        return f"Rotation({self.kind}, dim={self.dim}, seed={self.seed})"


@dataclass
class Annotated(Fact):
    """Every linear carries its `LinearAnnotation` (``node.meta["abqc"]``; None = float)."""

    quantized: int = 0
    total: int = 0
    output_path: str | None = None  # the output projection (lm_head), annotated on its own

    def describe(self) -> str:
        return f"Annotated({self.quantized}/{self.total} linears quantized)"


@dataclass
class BitWidths(Fact):
    """Per-linear weight widths chosen under a bit budget (`BitWidthAssignment`)."""

    report: dict = field(default_factory=dict)


@dataclass
class SmoothPairs(Fact):
    """Smoothing pairs (norm or linear -> linears) whose scales were folded into the weights."""

    pairs: list = field(default_factory=list)

    def describe(self) -> str:
        return f"SmoothPairs({len(self.pairs)} pairs)"


@dataclass
class QuantDequant(Fact):
    """Quantize/dequantize nodes surround every annotated linear (`InsertQuantDequant`)."""


@dataclass
class KVQuant(Fact):
    """Attention Q, K, V are fake-quantized at `bits` (graph only: no runtime KV cache yet)."""

    bits: int = 16


@dataclass
class Compensation(Fact):
    """Rank-1 down_proj compensation nodes in the graph: path -> (add node, a target, b target).
    Must be folded (``DownProjCompensation("fold")``) before weights are rounded."""

    entries: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"Compensation({len(self.entries)} linears)"


@dataclass
class CalibrationStats(Fact):
    """Solver statistics: per linear (layer-wise solvers) and per block (ABQ)."""

    linears: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)


@dataclass
class Sensitivity(Fact):
    """The per-linear sensitivity report (`SensitivityAnalysis`)."""

    report: dict = field(default_factory=dict)


@dataclass
class WeightCodes(Fact):
    """Every quantized weight is stored as integer codes on its grid (no float weight left
    behind a weight quantizer). ``rtn_errors``: relative weight error of the RTN-rounded ones."""

    rtn_errors: dict = field(default_factory=dict)


@dataclass
class Fused(Fact):
    """Quantize + dequantize pairs of activations are fused into ``fake_quant``."""


@dataclass
class Lowered(Fact):
    """Quantized linears run as ``abqc::qlinear`` on packed weights; `float_linears` maps the
    others to the reason they stayed in float."""

    float_linears: dict = field(default_factory=dict)


class FactStore:
    """The facts of one program (a view of ``gm.meta["abqc.facts"]``)."""

    def __init__(self, table: dict[str, Fact]):
        self._table = table

    def add(self, fact: Fact) -> Fact:
        self._table[fact.fact_name()] = fact
        return fact

    def get(self, kind: type[F], default: Any = None) -> F | None:
        return self._table.get(kind.fact_name(), default)

    def require(self, kind: type[F], who: str) -> F:
        """The fact, or a `ConfigError` saying which pass needs it and what provides it."""
        fact = self._table.get(kind.fact_name())
        if fact is None:
            raise ConfigError(f"{who} needs the program fact {kind.fact_name()}, which no pass "
                              f"before it provided (facts present: {self.names() or 'none'})")
        return fact

    def pop(self, kind: type[F]) -> F | None:
        return self._table.pop(kind.fact_name(), None)

    def names(self) -> list[str]:
        return list(self._table)

    def __contains__(self, kind: type[Fact]) -> bool:
        return kind.fact_name() in self._table

    def __iter__(self) -> Iterator[Fact]:
        return iter(list(self._table.values()))


def facts(gm) -> FactStore:
    """The fact store of graph module `gm` (created empty on first use)."""
    return FactStore(gm.meta.setdefault(FACTS_KEY, {}))
