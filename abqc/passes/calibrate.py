"""Calibrate: block-sequential, data-driven weight quantization (GPTQ, QuantEase, ...).

Runs the calibration windows through the model once, then solves the linears of each
decoder block in true-sequential order (derived from the graph) with the solver named by
each linear's annotation. Results go into the graph: the weight grid buffers are
replaced by the solver's, the weight quantize is folded into codes, and sparse outliers
(if any) become an ``abqc.add_outliers`` node after the weight's dequantize.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..calibration.blocks import decoder_blocks
from ..calibration.engine import calibrate_blocks
from ..calibration.order import sequential_groups
from ..capture import PATH_KEY
from ..errors import ConfigError
from ..facts import CalibrationStats, Compensation, QuantDequant, Source, WeightCodes, facts
from ..runtime.hf_model import transformers_tree
from ..ir import ANNOT_KEY
from ..ops import OPS
from .base import Pass, PassContext
from .graph_utils import add_param_node, insert_call, set_buffer
from .rtn import fold_weight_codes, weight_quantize_nodes


def calibration_windows(ctx: PassContext) -> torch.Tensor:
    """The context's calibration data as a LongTensor of windows [n, seqlen]."""
    from frontends import corpus

    if ctx._windows is not None:
        return ctx._windows
    cfg, calib, tok = ctx.require_config("calibration"), ctx.calib, ctx.tokenizer
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.dtype != torch.long:
            raise ConfigError(f"calib tensor must be a LongTensor [nsamples, seqlen], got "
                              f"{calib.dtype} of shape {tuple(calib.shape)}")
        ctx._windows = calib
        return calib
    if tok is None:
        raise ConfigError(f"method {cfg.method!r} needs calibration data: pass calib=<LongTensor "
                          "[n, seqlen]>, or tokenizer=<the model's tokenizer> (with calib=<texts> "
                          f"or the default corpus {cfg.calib_corpus!r})")
    text = "\n\n".join(calib) if calib is not None else corpus.load_text(cfg.calib_corpus)
    ctx._windows = corpus.calibration_windows(tok, text, cfg.nsamples, cfg.seqlen, cfg.seed)
    return ctx._windows


class Calibrate(Pass):
    """Solve every annotated linear inside the decoder blocks with its own method.

    The blocks are read from the program (`transformers_tree` over the graph's current
    tensors), so whatever ran before (smoothing, rotation) is what the solvers see."""

    requires = (Source, QuantDequant)
    ensures = (CalibrationStats,)
    before = (WeightCodes, Compensation)

    def __init__(self, batch_size: int = 8, solver_options: dict | None = None,
                 device: str = "cpu"):
        self.batch_size = batch_size
        self.solver_options = dict(solver_options or {})
        self.device = device

    def transform(self, gm: GraphModule) -> GraphModule:
        ctx = PassContext.current()
        model = transformers_tree(gm, lowered=False)
        qnodes = {n.meta[PATH_KEY]: n for n in weight_quantize_nodes(gm)}
        anns = {n.meta[PATH_KEY]: n.meta[ANNOT_KEY] for n in gm.graph.nodes
                if n.meta.get(ANNOT_KEY) is not None and n.meta[PATH_KEY] in qnodes}
        if self.device != "cpu" and not torch.cuda.is_available():
            raise ConfigError(f"calib_device={self.device!r} needs a CUDA GPU, and torch sees "
                              "none here; use calib_device='cpu'")
        prefix, _ = decoder_blocks(model)
        groups = sequential_groups(gm, prefix, set(anns))
        windows = calibration_windows(ctx)
        from ..solvers import solve

        results = calibrate_blocks(model, anns, groups, windows, solve, self.batch_size,
                                   self.solver_options, device=self.device)
        for path, res in results.items():
            q = qnodes[path]
            _, s, z, _, _ = q.args
            set_buffer(gm, s.target, res.scale.to(torch.float32))
            set_buffer(gm, z.target, res.zero.to(torch.float32))
            (dq,) = list(q.users)
            fold_weight_codes(gm, q, res.codes)
            if res.outliers is not None:
                h = res.outliers.coalesce()
                base = s.target.rpartition(".")[0]
                after = next(iter(dq.users))
                idx = add_param_node(gm, f"{base}.weight_outlier_indices", h.indices().clone(), after)
                val = add_param_node(gm, f"{base}.weight_outlier_values", h.values().float().clone(), after)
                add = insert_call(gm, after, OPS.add_outliers.default, (dq, idx, val),
                                  "weight_outliers", path)
                after.replace_input_with(dq, add)
        facts(gm).add(CalibrationStats(linears={p: r.stats for p, r in results.items()}))
        return gm
