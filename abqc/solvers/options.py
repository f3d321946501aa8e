"""Solver options: one typed set shared by every method, validated once.

The Calibrate pass hands the same options to every linear, whatever its method, so a
method reads the fields it needs and ignores the rest; unknown names are refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

OUTLIER_STRUCTURES = ("unstructured", "structured")


@dataclass(frozen=True)
class SolverOptions:
    """Knobs of the layer-wise solvers (defaults follow the GPTQ and QuantEase references)."""

    # GPTQ
    percdamp: float = 0.01  # damping = percdamp * mean(diag Σ)
    blocksize: int = 128  # columns per lazy-update block (GPTQ and the QuantEase sweep)
    act_order: bool = False  # columns by descending diag Σ (GPTQ and QuantEase)
    static_groups: bool = False  # GPTQ: group grids fitted on the original W up front
    damp_retries: int = 3  # GPTQ: times the damping is raised x10 when Cholesky fails
    # QuantEase
    sweeps: int = 30  # coordinate-descent sweeps over all columns
    relax: bool = True  # sweeps 1, 4, 7, ... skip rounding (the reference schedule)
    qe_damp: float = 0.0  # Σ += qe_damp * mean(diag Σ) * I before the sweeps (0 = reference)
    # outlier-aware QuantEase
    outlier_fraction: float = 0.01  # share of entries (unstructured) or columns (structured)
    outlier_structure: str = "unstructured"

    def __post_init__(self):
        if not 0 <= self.percdamp <= 10:
            raise ConfigError(f"percdamp={self.percdamp!r} is not allowed; use a number in [0, 10]")
        if not 0 <= self.qe_damp <= 10:
            raise ConfigError(f"qe_damp={self.qe_damp!r} is not allowed; use a number in [0, 10]")
        for name in ("blocksize", "sweeps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is not allowed; use a positive integer")
        if isinstance(self.damp_retries, bool) or not isinstance(self.damp_retries, int) \
                or self.damp_retries < 0:
            raise ConfigError(f"damp_retries={self.damp_retries!r} is not allowed; use an integer >= 0")
        if not 0 < self.outlier_fraction < 1:
            raise ConfigError(f"outlier_fraction={self.outlier_fraction!r} is not allowed; "
                              "use a fraction in (0, 1), e.g. 0.01")
        if self.outlier_structure not in OUTLIER_STRUCTURES:
            raise ConfigError(f"outlier_structure={self.outlier_structure!r} is not allowed; "
                              f"use one of {list(OUTLIER_STRUCTURES)}")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "SolverOptions":
        options = dict(options or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown solver option(s) {unknown}; allowed: {allowed}")
        return cls(**options)
