"""abqc's passes and named pipelines.

``abqc.passes.pipeline("rtn", config)`` returns the `Sequential` that `abqc.compile`
runs; run it under a `PassContext` to print, dump or time each pass.
"""
from __future__ import annotations

from typing import Callable

from ..config import FLOAT_BITS, CompileConfig
from ..errors import ConfigError
from .abq import ABQCalibrate
from .annotate import AnnotateQuant
from .bitwidth import BitWidthAssignment
from .calibrate import Calibrate
from .compensation import DownProjCompensation
from .base import Pass, PassContext, PassInstrument, Sequential
from .fuse_qdq import QuantDequantFusion
from .insert_qdq import InsertQuantDequant
from .lower import LowerToKernels
from .instruments import DumpIR, PassTimings, PrintIR
from .kv_quant import QuantizeAttention
from .rotate import Rotate
from .rtn import RoundToNearest
from .smooth import Smooth


def _bits(config: CompileConfig) -> list[Pass]:
    return ([BitWidthAssignment(config.bit_budget, config.bit_widths, sensitivity=config.bit_sensitivity)]
            if config.bit_budget else [])


def _smooth(config: CompileConfig) -> list[Pass]:
    """Passes between annotation and quantizer insertion: bit widths, then smoothing."""
    return _bits(config) + ([Smooth(config.smooth_alpha)] if config.smooth else [])


def _kv(config: CompileConfig) -> list[Pass]:
    return [QuantizeAttention(config.kv_bits, config.act_symmetric)] if config.kv_bits != FLOAT_BITS else []


def _lowering(config: CompileConfig) -> list[Pass]:
    return [LowerToKernels(tune=config.tune)] if config.backend == "kernels" else []


def _rotate(config: CompileConfig) -> list[Pass]:
    return [Rotate(config.rotate, config.seed)] if config.rotate else []


def _rtn(config: CompileConfig) -> list[Pass]:
    return [*_rotate(config), AnnotateQuant(config), *_smooth(config), InsertQuantDequant(), *_kv(config),
            RoundToNearest(), QuantDequantFusion(), *_lowering(config)]


def _calibrated(config: CompileConfig) -> list[Pass]:
    return [*_rotate(config), AnnotateQuant(config), *_smooth(config), InsertQuantDequant(), *_kv(config),
            Calibrate(solver_options=dict(config.solver_options), device=config.calib_device),
            RoundToNearest(), QuantDequantFusion(), *_lowering(config)]


def _abq(config: CompileConfig) -> list[Pass]:
    """Smooth (the SmoothQuant start), compensation nodes, ABQ training, fold, round."""
    from ..calibration.abq_options import ABQOptions

    opts = ABQOptions.from_dict(dict(config.abq_options))
    comp = ([DownProjCompensation("insert", opts.comp_first, opts.comp_last)]
            if opts.compensation else [])
    return [*_rotate(config), AnnotateQuant(config), *_bits(config), Smooth(config.smooth_alpha),
            InsertQuantDequant(),
            *_kv(config),
            *comp, ABQCalibrate(dict(config.abq_options), config.kv_bits, config.act_symmetric),
            *([DownProjCompensation("fold")] if comp else []), RoundToNearest(), QuantDequantFusion(),
            *_lowering(config)]


PIPELINES: dict[str, Callable[[CompileConfig], list[Pass]]] = {
    "rtn": _rtn, "gptq": _calibrated, "quantease": _calibrated,
    "quantease_outlier": _calibrated, "gptq_quantease": _calibrated, "calibrate": _calibrated, "abq": _abq}


def pipeline_name(config: CompileConfig) -> str:
    """The pipeline `abqc.compile` runs for `config`."""
    methods = config.methods()
    if methods == {"rtn"}:
        return "rtn"
    return "abq" if "abq" in methods else "calibrate"


def pipeline(name: str, config: CompileConfig | None = None) -> Sequential:
    """The named pipeline, built for `config` (defaults when omitted)."""
    if name not in PIPELINES:
        raise ConfigError(f"pipeline {name!r} is unknown; known pipelines: {sorted(PIPELINES)}")
    return Sequential(PIPELINES[name](config or CompileConfig(method=name)), name=name)


__all__ = ["ABQCalibrate", "AnnotateQuant", "BitWidthAssignment", "Calibrate", "DownProjCompensation",
           "DumpIR", "InsertQuantDequant", "LowerToKernels", "Pass", "PassContext",
           "PassInstrument", "PassTimings", "PrintIR", "QuantDequantFusion", "QuantizeAttention",
           "Rotate", "RoundToNearest",
           "Sequential", "Smooth", "pipeline", "pipeline_name", "PIPELINES"]
