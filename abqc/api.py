"""`abqc.compile`: capture a model, run the pass pipeline, return a CompiledModel."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from .capture import capture, check_model
from .compiled import CompiledModel
from .config import CompileConfig
from .errors import ConfigError
from .facts import Source
from .passes import DumpIR, PassContext, PassTimings, PrintIR, pipeline, pipeline_name

log = logging.getLogger("abqc")


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
    return cm
