"""InsertQuantDequant: make each annotated linear's quantization explicit in the graph.

Before: ``linear(x, @w, b)``. After::

    scale_x, zero_x = abqc.choose_qparams(x, qmax, sym, 0)      # per token, at run time
    x_dq = abqc.dequantize(abqc.quantize(x, scale_x, zero_x, qmax, 0), scale_x, zero_x, 0)
    w_dq = abqc.dequantize(abqc.quantize(@w, @w_scale, @w_zero, qmax, g), @w_scale, @w_zero, g)
    linear(x_dq, w_dq, b)

Linears that read the same input with the same activation spec (q/k/v, gate/up) share
one activation quantizer: the input is quantized once, as the integer kernels will do.

The weight grid (`<module>.weight_scale`, `.weight_zero`) starts as min/max per output
channel or group; calibration passes may refine it and fold the weight quantize away.
"""
from __future__ import annotations

from torch.fx import GraphModule

from ..capture import linear_nodes
from ..ir import ANNOT_KEY
from ..ops import OPS
from ..quantizer import qparams_for
from ..facts import Annotated, QuantDequant, facts
from .base import Pass
from .graph_utils import add_param_node, get_tensor, insert_call, insert_pair

ACT_QUANT = "act_quant"
WEIGHT_QUANT = "weight_quant"


class InsertQuantDequant(Pass):
    """Insert quantize/dequantize pairs on the inputs and weights of annotated linears."""

    requires = (Annotated,)
    ensures = (QuantDequant,)

    def transform(self, gm: GraphModule) -> GraphModule:
        shared = {}  # (input node, act spec) -> dequantized input
        for lin in linear_nodes(gm):
            ann = lin.meta.get(ANNOT_KEY)
            if ann is None:
                continue
            x, w = lin.args[0], lin.args[1]
            if ann.act is not None and (x, ann.act) in shared:
                lin.update_arg(0, shared[(x, ann.act)])
            elif ann.act is not None:
                a = ann.act
                s, z = insert_pair(gm, lin, OPS.choose_qparams.default,
                                   (x, a.qmax, a.symmetric, a.group_size), ACT_QUANT, ann.path)
                q = insert_call(gm, lin, OPS.quantize.default, (x, s, z, a.qmax, a.group_size),
                                ACT_QUANT, ann.path)
                dq = insert_call(gm, lin, OPS.dequantize.default, (q, s, z, a.group_size),
                                 ACT_QUANT, ann.path)
                lin.update_arg(0, dq)
                shared[(x, a)] = dq
            if ann.weight is not None:
                spec = ann.weight
                prefix = w.target.rpartition(".")[0]
                scale, zero = qparams_for(get_tensor(gm, w.target).detach(), spec)
                s = add_param_node(gm, f"{prefix}.weight_scale", scale, lin)
                z = add_param_node(gm, f"{prefix}.weight_zero", zero, lin)
                q = insert_call(gm, lin, OPS.quantize.default, (w, s, z, spec.qmax, spec.group_size),
                                WEIGHT_QUANT, ann.path)
                dq = insert_call(gm, lin, OPS.dequantize.default, (q, s, z, spec.group_size),
                                 WEIGHT_QUANT, ann.path)
                lin.update_arg(1, dq)
        facts(gm).add(QuantDequant())
        return gm
