"""abqc's passes and named pipelines.

``abqc.passes.pipeline("rtn", config)`` returns the `Sequential` that `abqc.compile`
runs; run it under a `PassContext` to print, dump or time each pass.
"""
from __future__ import annotations

from typing import Callable

from ..config import CompileConfig
from ..errors import ConfigError
from .annotate import AnnotateQuant
from .calibrate import Calibrate
from .base import Pass, PassContext, PassInstrument, Sequential
from .fuse_qdq import QuantDequantFusion
from .insert_qdq import InsertQuantDequant
from .lower import LowerToKernels
from .instruments import DumpIR, PassTimings, PrintIR
from .rtn import RoundToNearest


def _lowering(config: CompileConfig) -> list[Pass]:
    return [LowerToKernels(tune=config.tune)] if config.backend == "kernels" else []


def _rtn(config: CompileConfig) -> list[Pass]:
    return [AnnotateQuant(config), InsertQuantDequant(), RoundToNearest(), QuantDequantFusion(),
            *_lowering(config)]


def _calibrated(config: CompileConfig) -> list[Pass]:
    return [AnnotateQuant(config), InsertQuantDequant(),
            Calibrate(solver_options=dict(config.solver_options)),
            RoundToNearest(), QuantDequantFusion(), *_lowering(config)]


PIPELINES: dict[str, Callable[[CompileConfig], list[Pass]]] = {
    "rtn": _rtn, "gptq": _calibrated, "quantease": _calibrated,
    "quantease_outlier": _calibrated, "gptq_quantease": _calibrated, "calibrate": _calibrated}


def pipeline(name: str, config: CompileConfig | None = None) -> Sequential:
    """The named pipeline, built for `config` (defaults when omitted)."""
    if name not in PIPELINES:
        raise ConfigError(f"pipeline {name!r} is unknown; known pipelines: {sorted(PIPELINES)}")
    return Sequential(PIPELINES[name](config or CompileConfig(method=name)), name=name)


__all__ = ["AnnotateQuant", "Calibrate", "DumpIR", "InsertQuantDequant", "LowerToKernels", "Pass", "PassContext",
           "PassInstrument", "PassTimings", "PrintIR", "QuantDequantFusion", "RoundToNearest",
           "Sequential", "pipeline", "PIPELINES"]
