"""RoundToNearest: the data-free calibration. Each weight quantize is folded into
stored integer codes, so the graph reads ``dequantize(@w_codes, @w_scale, @w_zero)``."""
from __future__ import annotations

import logging

from torch.fx import GraphModule

from ..capture import PATH_KEY
from ..ops import OPS
from ..quantizer import dequantize, quantize
from ..facts import Compensation, QuantDequant, WeightCodes, facts
from .base import Pass
from .graph_utils import add_param_node, erase_if_unused, get_tensor
from .insert_qdq import WEIGHT_QUANT
from ..ir import ROLE_KEY

log = logging.getLogger("abqc")


def weight_quantize_nodes(gm: GraphModule):
    """Weight quantize nodes still reading a float weight: ``quantize(@w, @s, @z, qmax, g)``."""
    return [n for n in gm.graph.nodes
            if n.target is OPS.quantize.default and n.meta.get(ROLE_KEY) == WEIGHT_QUANT
            and n.args[0].op == "get_attr"]


def fold_weight_codes(gm: GraphModule, qnode, codes) -> None:
    """Replace ``quantize(@w, ...)`` by a stored uint8 buffer `<module>.weight_codes`."""
    w = qnode.args[0]
    prefix = w.target.rpartition(".")[0]
    cnode = add_param_node(gm, f"{prefix}.weight_codes", codes, qnode)
    qnode.replace_all_uses_with(cnode)
    gm.graph.erase_node(qnode)
    erase_if_unused(gm, w)


class RoundToNearest(Pass):
    """Round every remaining float weight to its grid (the `rtn` method)."""

    requires = (QuantDequant,)
    ensures = (WeightCodes,)
    before = (Compensation,)  # fold it first: a compensated weight is W + a bᵀ, not @w

    def transform(self, gm: GraphModule) -> GraphModule:
        errors = {}
        for q in weight_quantize_nodes(gm):
            w, s, z, qmax, gs = q.args
            weight = get_tensor(gm, w.target).detach()
            scale, zero = get_tensor(gm, s.target), get_tensor(gm, z.target)
            codes = quantize(weight, scale, zero, qmax, gs)
            err = float((dequantize(codes, scale, zero, gs) - weight).norm() / weight.norm())
            errors[q.meta.get(PATH_KEY)] = err
            log.debug("rtn %-40s rel. weight error %.4f", q.meta.get(PATH_KEY), err)
            fold_weight_codes(gm, q, codes)
        if errors:
            worst = max(errors, key=errors.get)
            log.info("rtn: %d weights rounded; relative error ||W-Ŵ||/||W|| mean %.4f, max %.4f (%s)",
                     len(errors), sum(errors.values()) / len(errors), errors[worst], worst)
        facts(gm).add(WeightCodes(rtn_errors=errors))
        return gm
