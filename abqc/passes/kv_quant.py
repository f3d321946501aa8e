"""QuantizeAttention: fake-quantize attention's Q, K and V (option ``kv_bits``).

Q and K are quantized where attention reads them, after RoPE (and after GQA's repeat):
per token and head, i.e. along the head dimension of ``[batch, heads, seq, head_dim]``.
V is quantized per token over all its heads, at the output of the value projection
(found from the graph by following attention's value input back to its linear);
without such a linear it falls back to per token and head at attention's input.
Dynamic min/max qparams, as for linear inputs. Off by default.
"""
from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

from ..capture import module_path
from ..config import QuantSpec
from ..ops import OPS
from ..facts import Fused, KVQuant, QuantDequant, facts
from .base import Pass
from .graph_utils import insert_call, insert_pair
from .smooth_pairs import ATTENTION_OPS, _linear_behind

log = logging.getLogger("abqc")
KV_QUANT = "kv_quant"


def _fake_quant_before(gm: GraphModule, before: Node, x: Node, spec: QuantSpec, path: str | None) -> Node:
    s, z = insert_pair(gm, before, OPS.choose_qparams.default, (x, spec.qmax, spec.symmetric, 0),
                       KV_QUANT, path)
    q = insert_call(gm, before, OPS.quantize.default, (x, s, z, spec.qmax, 0), KV_QUANT, path)
    return insert_call(gm, before, OPS.dequantize.default, (q, s, z, 0), KV_QUANT, path)


class QuantizeAttention(Pass):
    """Insert quantize/dequantize on Q, K (per token and head, after RoPE) and V (per token)."""

    requires = (QuantDequant,)
    ensures = (KVQuant,)
    before = (Fused,)

    def __init__(self, bits: int, symmetric: bool = False):
        self.bits = bits
        self.symmetric = symmetric

    def transform(self, gm: GraphModule) -> GraphModule:
        spec = QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="token", dynamic=True)
        attn = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]
        if not attn:
            log.warning("QuantizeAttention: no scaled_dot_product_attention in the graph; "
                        "kv_bits has no effect")
        for node in attn:
            v_lin = _linear_behind(node.args[2])
            path = module_path(v_lin).rpartition(".")[0] if v_lin is not None else None
            for i in (0, 1):
                node.update_arg(i, _fake_quant_before(gm, node, node.args[i], spec, path))
            if v_lin is None:
                node.update_arg(2, _fake_quant_before(gm, node, node.args[2], spec, path))
                continue
            users = list(v_lin.users)
            after = v_lin.next
            dq = _fake_quant_before(gm, after, v_lin, spec, path)
            for u in users:
                u.replace_input_with(v_lin, dq)
        log.info("kv quantization: Q, K, V of %d attention ops at %d bits", len(attn), self.bits)
        facts(gm).add(KVQuant(self.bits))
        return gm
