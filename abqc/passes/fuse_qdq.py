"""QuantDequantFusion: ``dequantize(quantize(x, s, z), s, z)`` becomes ``fake_quant(x, s, z)``.

One op instead of two, and no uint8 intermediate: what the fake-quant graph runs.
"""
from __future__ import annotations

from torch.fx import GraphModule

from ..ir import ROLE_KEY
from ..capture import PATH_KEY
from ..ops import OPS
from ..facts import Fused, QuantDequant, facts
from .base import Pass
from .graph_utils import insert_call


class QuantDequantFusion(Pass):
    requires = (QuantDequant,)
    ensures = (Fused,)

    def transform(self, gm: GraphModule) -> GraphModule:
        for q in [n for n in gm.graph.nodes if n.target is OPS.quantize.default]:
            x, s, z, qmax, gs = q.args
            users = list(q.users)
            if not users or not all(u.target is OPS.dequantize.default
                                    and u.args[1:] == (s, z, gs) for u in users):
                continue
            for dq in users:
                fq = insert_call(gm, dq, OPS.fake_quant.default, (x, s, z, qmax, gs),
                                 q.meta.get(ROLE_KEY, "fake_quant"), q.meta.get(PATH_KEY))
                dq.replace_all_uses_with(fq)
                gm.graph.erase_node(dq)
            gm.graph.erase_node(q)
        facts(gm).add(Fused())
        return gm
