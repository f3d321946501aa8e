"""BitWidthAssignment: per-linear weight widths under an average-bits budget.

Sensitivity of linear l at width b is the loss increase that quantizing it alone is
expected to cause, measured on calibration data. Default (``sensitivity="fisher"``): the
diagonal empirical Fisher of the language-model loss, ``err_l(b) = Σ_ij F_ij (W - Ŵ_b)_ij²``
with ``F = mean over windows of (∂loss/∂W)²`` (one backward per calibration window): in
loss units, so layers of different scale and depth compare. ``"loss"``: the loss increase
measured with that one linear quantized (a forward per linear and width, on the first
`loss_windows` windows): no model of the loss, at the price of many forwards. ``"output"``: the layer's own
output error ``tr(E Σ Eᵀ)`` (E = W - Ŵ_b, Σ = mean x xᵀ of its inputs) — cheaper (no
backward) but blind to how much each layer's output matters downstream; on SmolLM2 it
picks badly (bench/results/mixed_precision.json). Ŵ_b is RTN at width b.

The pass picks widths from `widths` minimising ``Σ_l err_l(b_l)`` subject to
``Σ_l size_l cost(b_l) <= budget Σ_l size_l`` (size = weight count; cost of "2*" =
log2(5) bits of information, though it is stored in 3): a greedy descent from the widest
setting, each step lowering the linear with the smallest error increase per bit saved
(the usual multiple-choice knapsack heuristic).

Linears that read the same input (q/k/v; gate/up) quantize that input once, so they
must share the activation width: groups are the connected components of the
input <-> linear graph (networkx), and each group takes its widest member's activation
spec. The choice is written into each linear's annotation (visible in the IR dump) and
into the program's `BitWidths` fact.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import networkx as nx
import torch
from tqdm import tqdm
from torch.fx import GraphModule, Interpreter, Node

from ..capture import is_linear, module_path
from ..config import BIT_BALANCE, weight_spec
from ..errors import ConfigError
from ..ir import ANNOT_KEY
from ..quantizer import dequantize, rtn
from ..facts import Annotated, BitWidths, QuantDequant, facts
from .base import Pass, PassContext
from .graph_utils import get_tensor

log = logging.getLogger("abqc")


def width_cost(w) -> float:
    return math.log2(5) if w == BIT_BALANCE else float(w)


class _Grams(Interpreter):
    """Accumulates Σ = Σ_t x xᵀ of each linear's input (and the token count)."""

    def __init__(self, gm: GraphModule, paths: set[str]):
        super().__init__(gm)
        self.paths = paths
        self.sigma: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}

    def run_node(self, n):
        if is_linear(n) and module_path(n) in self.paths:
            x = self.env[n.args[0]].detach().reshape(-1, self.env[n.args[0]].shape[-1]).float()
            p = module_path(n)
            self.sigma[p] = self.sigma.get(p, 0) + x.T @ x
            self.n[p] = self.n.get(p, 0) + x.shape[0]
        return super().run_node(n)


SENSITIVITIES = ("fisher", "loss", "output")


def _rtn_weight(w: torch.Tensor, b, ann) -> torch.Tensor:
    codes, s, z = rtn(w, weight_spec(b, ann.weight.symmetric, ann.weight.group_size))
    return dequantize(codes, s, z)


def _measured_losses(gm: GraphModule, lins: dict[str, Node], weights: dict[str, torch.Tensor],
                     widths, windows: torch.Tensor) -> dict[str, dict]:
    """Loss increase on `windows` with one linear at a time quantized (RTN) at each width:
    sensitivity measured, not modelled (len(lins) x len(widths) forward passes)."""
    def loss() -> float:
        logits = gm(windows)
        return float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1)))

    out: dict[str, dict] = {}
    with torch.no_grad():
        base = loss()
        for p in tqdm(lins, desc="bit widths: measured loss", unit="linear", leave=False):
            w = weights[p]
            orig = w.detach().clone()
            out[p] = {}
            for b in widths:
                w.copy_(_rtn_weight(orig.float(), b, lins[p].meta[ANNOT_KEY]).to(w.dtype))
                out[p][b] = loss() - base
            w.copy_(orig)
    return out


def _fisher(gm: GraphModule, weights: dict[str, torch.Tensor], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the next-token loss for each weight: mean over the
    calibration windows of the squared gradient (one forward + backward per window)."""
    params = list(gm.parameters())
    saved = [q.requires_grad for q in params]
    fisher = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in weights.items()}
    try:
        for q in params:
            q.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for i in tqdm(range(len(windows)), desc="bit widths: Fisher", unit="window", leave=False):
                ids = windows[i:i + 1]
                logits = gm(ids)
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                grads = torch.autograd.grad(loss, list(weights.values()))
                for p, g in zip(weights, grads):
                    fisher[p] += g.float() ** 2
    finally:
        for w in weights.values():
            w.requires_grad_(False)
        for q, r in zip(params, saved):
            q.requires_grad_(r)
    return {p: f / len(windows) for p, f in fisher.items()}


def shared_input_groups(gm: GraphModule, paths: set[str]) -> list[set[str]]:
    """Linears (module paths) that read one input node, as networkx connected components."""
    g = nx.Graph()
    for n in gm.graph.nodes:
        if is_linear(n) and module_path(n) in paths:
            g.add_edge(("linear", module_path(n)), ("input", n.args[0].name))
    return [{p for kind, p in comp if kind == "linear"} for comp in nx.connected_components(g)]


def greedy_assign(errors: dict[str, dict], sizes: dict[str, int], budget: float) -> dict[str, object]:
    """Widths minimising the summed error with size-weighted average cost <= budget."""
    order = {p: sorted(e, key=width_cost, reverse=True) for p, e in errors.items()}
    pick = {p: 0 for p in errors}  # index into order[p]: start at the widest
    total = sum(sizes.values())
    used = sum(sizes[p] * width_cost(order[p][0]) for p in errors)
    while used > budget * total + 1e-9:
        best, best_ratio = None, math.inf
        for p, i in pick.items():
            if i + 1 >= len(order[p]):
                continue
            hi, lo = order[p][i], order[p][i + 1]
            saved = sizes[p] * (width_cost(hi) - width_cost(lo))
            ratio = (errors[p][lo] - errors[p][hi]) / saved
            if ratio < best_ratio:
                best, best_ratio = p, ratio
        if best is None:
            raise ConfigError(f"bit budget {budget} is below the narrowest allowed widths "
                              f"({min((width_cost(w) for w in next(iter(order.values()))))} bits)")
        i = pick[best]
        used -= sizes[best] * (width_cost(order[best][i]) - width_cost(order[best][i + 1]))
        pick[best] = i + 1
    return {p: order[p][i] for p, i in pick.items()}


class BitWidthAssignment(Pass):
    """Choose each linear's weight width under an average budget; share act widths per input."""

    requires = (Annotated,)
    ensures = (BitWidths,)
    before = (QuantDequant,)

    def __init__(self, budget: float, widths=(BIT_BALANCE, 3, 4, 6, 8), batch_size: int = 4,
                 sensitivity: str = "fisher", loss_windows: int = 2):
        if not widths:
            raise ConfigError("BitWidthAssignment needs at least one allowed width")
        if sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity={sensitivity!r} is not allowed; use one of {list(SENSITIVITIES)}")
        self.budget, self.widths, self.batch_size = float(budget), tuple(widths), batch_size
        self.sensitivity, self.loss_windows = sensitivity, loss_windows

    def transform(self, gm: GraphModule) -> GraphModule:
        from .calibrate import calibration_windows

        out = facts(gm).get(Annotated).output_path  # lm_head keeps lm_head_bits
        lins: dict[str, Node] = {module_path(n): n for n in gm.graph.nodes
                                 if is_linear(n) and n.meta.get(ANNOT_KEY) is not None
                                 and module_path(n) != out}
        if not lins:
            raise ConfigError("BitWidthAssignment needs annotated linears: run AnnotateQuant first")
        windows = calibration_windows(PassContext.current())
        weights = {p: get_tensor(gm, n.args[1].target) for p, n in lins.items()}
        if self.sensitivity == "fisher":
            weigh = _fisher(gm, weights, windows)
        elif self.sensitivity == "output":
            grams = _Grams(gm, set(lins))
            with torch.no_grad():
                for i in range(0, len(windows), self.batch_size):
                    grams.run(windows[i:i + self.batch_size])
            weigh = {p: grams.sigma[p] / grams.n[p] for p in lins}
        errors, sizes = {}, {}
        measured = _measured_losses(gm, lins, weights, self.widths, windows[:self.loss_windows]) \
            if self.sensitivity == "loss" else None
        for p, n in lins.items():
            ann = n.meta[ANNOT_KEY]
            w = weights[p].detach().float()
            sizes[p] = w.numel()
            if measured is not None:
                errors[p] = measured[p]
                continue
            errors[p] = {}
            for b in self.widths:
                e = w - _rtn_weight(w, b, ann)
                errors[p][b] = float((weigh[p] * e * e).sum() if self.sensitivity == "fisher"
                                     else torch.einsum("ij,jk,ik->", e, weigh[p], e))
        choice = greedy_assign(errors, sizes, self.budget)
        for p, n in lins.items():
            ann = n.meta[ANNOT_KEY]
            n.meta[ANNOT_KEY] = dataclasses.replace(
                ann, weight=weight_spec(choice[p], ann.weight.symmetric, ann.weight.group_size))
        for group in shared_input_groups(gm, set(lins)):
            acts = [lins[p].meta[ANNOT_KEY].act for p in group]
            widest = None if any(a is None for a in acts) else max(acts, key=lambda a: a.bits)
            for p in group:
                lins[p].meta[ANNOT_KEY] = dataclasses.replace(lins[p].meta[ANNOT_KEY], act=widest)
        avg = sum(sizes[p] * width_cost(choice[p]) for p in choice) / sum(sizes.values())
        facts(gm).add(BitWidths({"budget": self.budget, "average_bits": avg, "sensitivity": self.sensitivity,
                               "widths": {p: choice[p] for p in lins},
                               "error": sum(errors[p][choice[p]] for p in choice)}))
        counts = {b: sum(v == b for v in choice.values()) for b in self.widths}
        log.info("bit widths: average %.3f bits (budget %.2f): %s", avg, self.budget,
                 ", ".join(f"W{b} x{c}" for b, c in counts.items() if c))
        return gm
