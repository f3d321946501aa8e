"""DownProjCompensation: ABQ's rank-1 correction ``W + a bᵀ`` as visible graph nodes.

``mode="insert"`` (before calibration) rewrites the weight side of each compensated linear

    quantize(@w, ...)   ->   quantize(add(@w, mm(@w_comp_a, @w_comp_b)), ...)

with ``a`` [N, 1] zeros and ``b`` [1, K] ones (so the model is unchanged until trained).
The compensated linears are the last linear of the first `first` and last `last` decoder
blocks (down_proj for Llama, fc2 for OPT), found from the graph's true-sequential levels.
``mode="fold"`` (after calibration) stores ``W + a bᵀ`` as the weight and removes the
nodes, so the weight can be rounded like any other. A dump of the IR shows both steps.
"""
from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from ..calibration.order import sequential_groups
from ..capture import PATH_KEY
from ..errors import ConfigError
from ..facts import Compensation, QuantDequant, Source, WeightCodes, facts
from .base import Pass
from .graph_utils import add_param_node, erase_if_unused, get_tensor, insert_call, set_buffer
from .insert_qdq import WEIGHT_QUANT
from ..ir import ROLE_KEY
from ..ops import OPS

log = logging.getLogger("abqc")
COMPENSATION = "compensation"
MODES = ("insert", "fold")


def compensated_paths(gm: GraphModule, block_prefix: str, n_blocks: int, first: int, last: int,
                      paths: set[str]) -> list[str]:
    """The last-level linears of the chosen blocks (their MLP output projection)."""
    groups = sequential_groups(gm, block_prefix, paths)
    chosen = [b for b in groups if b < first or b >= n_blocks - last]
    return [p for b in sorted(chosen) if groups[b] for p in groups[b][-1]]


class DownProjCompensation(Pass):
    """Insert (before calibration) or fold (after) the rank-1 down_proj compensation."""

    def __init__(self, mode: str, first: int = 3, last: int = 4):
        if mode not in MODES:
            raise ConfigError(f"DownProjCompensation mode={mode!r} is not allowed; use one of {list(MODES)}")
        self.mode, self.first, self.last = mode, first, last

    @property
    def requires(self):
        return (Source, QuantDequant) if self.mode == "insert" else (Compensation,)

    @property
    def ensures(self):
        return (Compensation,) if self.mode == "insert" else ()

    @property
    def consumes(self):
        return () if self.mode == "insert" else (Compensation,)

    before = (WeightCodes,)

    def transform(self, gm: GraphModule) -> GraphModule:
        return self._insert(gm) if self.mode == "insert" else self._fold(gm)

    def _weight_quant(self, gm: GraphModule) -> dict[str, torch.fx.Node]:
        return {n.meta[PATH_KEY]: n for n in gm.graph.nodes if n.target is OPS.quantize.default
                and n.meta.get(ROLE_KEY) == WEIGHT_QUANT and n.args[0].op == "get_attr"}

    def _insert(self, gm: GraphModule) -> GraphModule:
        from ..calibration.blocks import decoder_blocks

        prefix, blocks = decoder_blocks(facts(gm).require(Source, self.name).skeleton)
        qnodes = self._weight_quant(gm)
        comps = facts(gm).add(Compensation()).entries
        for path in compensated_paths(gm, prefix, len(blocks), self.first, self.last, set(qnodes)):
            q = qnodes[path]
            w = q.args[0]
            n, k = get_tensor(gm, w.target).shape
            base = w.target.rpartition(".")[0]
            a = add_param_node(gm, f"{base}.comp_a", torch.zeros(n, 1), q)
            b = add_param_node(gm, f"{base}.comp_b", torch.ones(1, k), q)
            ab = insert_call(gm, q, torch.ops.aten.mm.default, (a, b), COMPENSATION, path)
            w2 = insert_call(gm, q, torch.ops.aten.add.Tensor, (w, ab), COMPENSATION, path)
            q.update_arg(0, w2)
            comps[path] = (w2.name, a.target, b.target)
        log.info("down_proj compensation inserted at %d linears", len(comps))
        return gm

    def _fold(self, gm: GraphModule) -> GraphModule:
        comps = facts(gm).pop(Compensation).entries
        by_name = {n.name: n for n in gm.graph.nodes}
        for path, (add_name, a_t, b_t) in comps.items():
            add = by_name[add_name]
            w, ab = add.args
            a, b = ab.args
            weight = get_tensor(gm, w.target).detach()
            folded = weight.float() + get_tensor(gm, a_t).float() @ get_tensor(gm, b_t).float()
            set_buffer(gm, w.target, folded.to(weight.dtype))
            add.replace_all_uses_with(w)
            gm.graph.erase_node(add)
            gm.graph.erase_node(ab)
            erase_if_unused(gm, a)
            erase_if_unused(gm, b)
        log.info("down_proj compensation folded into %d weights", len(comps))
        return gm
