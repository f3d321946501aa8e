"""Smooth: SmoothQuant's per-channel scales, folded into the weights.

For each smoothing pair found in the graph (`smooth_pairs`), with the largest
calibration activation ``max|X_j|`` of the shared input and the largest weight
``max|W_:,j|`` over every consumer:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

The source (norm weight and bias, or the producing linear's rows) is divided by s and the
consumers' columns multiplied by it: the float model is unchanged, the activation
outliers move into the weights. The pairs go to the program's `SmoothPairs` fact for
later passes (ABQ learns on top of these scales).
"""
from __future__ import annotations

import logging
import time

import torch
from torch.fx import GraphModule, Interpreter
from tqdm.auto import tqdm

from ..capture import is_linear, module_path
from ..ir import ANNOT_KEY
from ..facts import Annotated, QuantDequant, SmoothPairs, WeightCodes, facts
from .base import Pass, PassContext
from .graph_utils import get_tensor
from .smooth_pairs import SmoothPair, find_smooth_pairs, fold_smoothing

log = logging.getLogger("abqc")
MIN_SCALE = 1e-5


class _InputAbsMax(Interpreter):
    """Runs the graph and keeps, per watched linear, the per-channel max |input|."""

    def __init__(self, gm: GraphModule, paths: set[str]):
        super().__init__(gm)
        self.paths = paths
        self.amax: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        if is_linear(n) and module_path(n) in self.paths:
            x = self.env[n.args[0]].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            p = module_path(n)
            self.amax[p] = torch.maximum(self.amax[p], m) if p in self.amax else m
        return super().run_node(n)


@torch.no_grad()
def input_absmax(gm: GraphModule, windows: torch.Tensor, paths: set[str],
                 batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each linear's input in `paths`, over calibration `windows`."""
    interp = _InputAbsMax(gm, paths)
    for i in tqdm(range(0, len(windows), batch_size), desc="smooth: activation maxima", unit="batch"):
        interp.run(windows[i:i + batch_size])
    return interp.amax


def smoothquant_scales(pair: SmoothPair, x_amax: torch.Tensor, w_amax: torch.Tensor,
                       alpha: float) -> torch.Tensor:
    """s per source channel from per-consumer-channel maxima (reduced over GQA groups)."""
    if pair.index is not None:
        x_amax = torch.zeros(pair.channels).scatter_reduce(0, pair.index, x_amax, "amax")
        w_amax = torch.zeros(pair.channels).scatter_reduce(0, pair.index, w_amax, "amax")
    s = x_amax.clamp(min=MIN_SCALE).pow(alpha) / w_amax.clamp(min=MIN_SCALE).pow(1 - alpha)
    s = torch.where((x_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(min=MIN_SCALE)


class Smooth(Pass):
    """Fold SmoothQuant scales between each norm/linear and the quantized linears it feeds."""

    requires = (Annotated,)
    ensures = (SmoothPairs,)
    before = (QuantDequant, WeightCodes)

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha

    def transform(self, gm: GraphModule) -> GraphModule:
        from .calibrate import calibration_windows

        quantized = {module_path(n) for n in gm.graph.nodes
                     if is_linear(n) and n.meta.get(ANNOT_KEY) is not None}
        pairs = find_smooth_pairs(gm, quantized)
        facts(gm).add(SmoothPairs(pairs))
        if not pairs:
            log.warning("Smooth: no foldable norm/linear -> linear pair found")
            return gm
        t0 = time.perf_counter()
        windows = calibration_windows(PassContext.current())
        consumers = {p for pair in pairs for p in pair.consumers}
        amax = input_absmax(gm, windows, consumers)
        for pair in pairs:
            x_amax = amax[pair.consumers[0]]
            w_amax = torch.stack([get_tensor(gm, w).detach().abs().amax(dim=0).float()
                                  for w in pair.consumer_weights]).amax(dim=0)
            s = smoothquant_scales(pair, x_amax, w_amax, self.alpha)
            fold_smoothing(gm, pair, s)
            log.debug("smooth %-40s -> %s: s in [%.3g, %.3g]", pair.source,
                      ",".join(c.rsplit(".", 1)[-1] for c in pair.consumers), s.min(), s.max())
        log.info("smooth: %d pairs (%d norm, %d linear) folded in %.1fs", len(pairs),
                 sum(p.kind == "norm" for p in pairs), sum(p.kind == "linear" for p in pairs),
                 time.perf_counter() - t0)
        return gm
