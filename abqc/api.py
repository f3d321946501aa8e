"""`abqc.compile`: capture a model, run the pass pipeline, return a CompiledModel."""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import torch
from torch import nn

from .capture import capture, check_model
from .compiled import CompiledModel
from .config import CompileConfig
from .errors import ConfigError, UnsupportedModelError, warn_or_raise
from .facts import Source
from .passes import DumpIR, PassContext, PassTimings, PrintIR, pipeline, pipeline_name

log = logging.getLogger("abqc")


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite weights (they would be rounded into a grid of
    NaNs, or clip every other weight of their row to zero), naming the tensors and counts."""
    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not p.is_meta:
                n = int((~torch.isfinite(p)).sum())
                if n:
                    bad.append(f"{name} ({n} of {p.numel()})")
    if bad:
        raise UnsupportedModelError(
            f"the model has non-finite weights (NaN or inf): {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else "")
            + "; quantizing them would give NaN or zeroed rows. Fix or reload the checkpoint")


def check_patterns(model: nn.Module, config: CompileConfig) -> None:
    """An `exclude` or `overrides` regex that matches no linear of the model does nothing:
    a warning naming it (an error with ``strict=True``)."""
    paths = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) or type(m).__name__ == "QuantLinear"]
    for kind, pats in (("exclude", list(config.exclude)), ("overrides", list(config.overrides))):
        for pat in pats:
            if not any(re.search(pat, p) for p in paths):
                warn_or_raise(f"{kind} pattern {pat!r} matches no linear of the model, so it has "
                              f"no effect (linears are named like {paths[:2]}; patterns are "
                              "searched with re.search)", config.strict, stacklevel=4)


def compile(model: nn.Module, wbits: int = 4, abits: int = 16, *,
            calib: Sequence[str] | torch.Tensor | None = None, tokenizer=None,
            **options: Any) -> CompiledModel:
    """Quantize `model` (a Hugging Face causal LM) to `wbits` weights and `abits` activations.

    `abits=16` keeps activations in float (weight-only). `calib` is calibration data:
    a list of texts (tokenized with `tokenizer`) or a LongTensor of token windows
    (data-driven methods use it; RTN does not). Other options are the fields of `CompileConfig` (``method``,
    ``group_size``, ``symmetric``, ``overrides``, ``exclude``, ``dump_ir``, ...);
    unknown options and bad values raise `ConfigError`.
    """
    config = CompileConfig.from_options(wbits=wbits, abits=abits, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch nn.Module (a transformers causal LM), "
                          f"got {type(model).__name__}")
    check_model(model)
    check_finite_weights(model)
    check_patterns(model, config)
    if calib is not None and not isinstance(calib, (list, tuple, torch.Tensor)):
        raise ConfigError(f"calib must be a list of texts or a LongTensor of token ids, "
                          f"got {type(calib).__name__}")
    data_free = config.methods() == {"rtn"} and not config.smooth and config.bit_budget is None
    if calib is not None and data_free:
        log.info("method 'rtn' is data-free: the calibration data is not used")

    passes = pipeline(pipeline_name(config), config)
    passes.check({Source})  # refuse a misordered pipeline before the (slow) capture
    gm = capture(model, config.max_seq_len)
    timings = PassTimings()
    instruments = [timings]
    if config.dump_ir:
        instruments.append(DumpIR(config.dump_ir))
    if config.print_ir:
        instruments.append(PrintIR())
    # the program owns every tensor from here on: passes, calibration and the transformers
    # tree (generate, save) read the graph, never `model`
    with torch.no_grad(), PassContext(instruments, config=config, calib=calib, tokenizer=tokenizer):
        gm = passes(gm)
    cm = CompiledModel(gm, config, pass_timings=timings.records)
    cm.tokenizer = tokenizer
    if log.isEnabledFor(logging.INFO):
        log.info("compiled %s", cm.report())  # the one-line summary (abqc.report)
    return cm
