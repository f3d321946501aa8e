"""RoundToNearest: the data-free calibration. Each weight quantize is folded into
stored integer codes, so the graph reads ``dequantize(@w_codes, @w_scale, @w_zero)``."""
from __future__ import annotations

from torch.fx import GraphModule

from ..ops import OPS
from ..quantizer import quantize
from .base import Pass
from .graph_utils import add_param_node, erase_if_unused, get_tensor
from .insert_qdq import WEIGHT_QUANT
from ..ir import ROLE_KEY


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

    def transform(self, gm: GraphModule) -> GraphModule:
        for q in weight_quantize_nodes(gm):
            w, s, z, qmax, gs = q.args
            codes = quantize(get_tensor(gm, w.target).detach(), get_tensor(gm, s.target),
                             get_tensor(gm, z.target), qmax, gs)
            fold_weight_codes(gm, q, codes)
        return gm
