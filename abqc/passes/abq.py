"""ABQCalibrate: ABQ-LLM block calibration (`method="abq"`), learnt values folded into the graph.

Runs after `Smooth` (its pairs, already carrying the SmoothQuant scales, are what ABQ
learns on top of), `InsertQuantDequant` and `DownProjCompensation("insert")`. Per block,
`calibration.abq.train_block` learns smoothing scales, weight clipping and the rank-1
compensation; then this pass writes them back:

- each learnt scale is folded like SmoothQuant's (`fold_smoothing`): source divided,
  consumers' columns multiplied;
- each linear's learnt grid replaces ``<module>.weight_scale`` / ``.weight_zero``;
- the compensation vectors replace ``<module>.comp_a`` / ``.comp_b`` (folded into the
  weight by `DownProjCompensation("fold")`; RoundToNearest then rounds on the learnt grid).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..calibration.abq import AttentionSpec, BlockPlan, train_block
from ..calibration.abq_options import ABQOptions
from ..calibration.blocks import decoder_blocks
from ..calibration.engine import run_blocks
from ..calibration.order import block_of
from ..capture import PATH_KEY, ROOT, is_linear, module_path
from ..config import QuantSpec
from ..errors import ConfigError
from ..facts import CalibrationStats, Compensation, QuantDequant, SmoothPairs, Source, WeightCodes, facts
from ..runtime.hf_model import transformers_tree
from ..ir import ANNOT_KEY, ROLE_KEY
from ..ops import OPS
from .base import Pass, PassContext
from .calibrate import calibration_windows
from .graph_utils import get_tensor, set_buffer
from .insert_qdq import WEIGHT_QUANT
from .kv_quant import KV_QUANT
from .smooth_pairs import ATTENTION_OPS, fold_smoothing



def _linear_reached(start: Node) -> Node | None:
    """The nearest linear upstream of `start` (breadth first, parameters ignored)."""
    seen, frontier = set(), [start]
    while frontier:
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, Node):
                continue
            seen.add(n)
            if is_linear(n):
                return n
            nxt.extend(a for a in n.all_input_nodes if a.op != "get_attr")
        frontier = nxt
    return None


def attention_projections(gm: GraphModule) -> list[tuple[str, str]]:
    """(q path, k path) feeding each attention op of the graph."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ATTENTION_OPS:
            q, k = _linear_reached(n.args[0]), _linear_reached(n.args[1])
            if q is not None and k is not None:
                out.append((module_path(q), module_path(k)))
    return out


def _heads(model) -> tuple[int, int, int]:
    cfg = model.config
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    return h, kv, hd


class ABQCalibrate(Pass):
    """Train each decoder block's smoothing, clipping and compensation on DLC + AKL."""

    def __init__(self, options: dict | None = None, kv_bits: int = 16, act_symmetric: bool = False):
        self.options = dict(options or {})
        self.kv_bits = kv_bits
        self.act_symmetric = act_symmetric

    requires = (Source, SmoothPairs, QuantDequant)
    ensures = (CalibrationStats,)
    before = (WeightCodes,)

    def transform(self, gm: GraphModule) -> GraphModule:
        ctx = PassContext.current()
        model = transformers_tree(gm, lowered=False)  # the program's current (smoothed) blocks
        opts = ABQOptions.from_dict(self.options)
        prefix, blocks = decoder_blocks(model)
        qnodes = {n.meta[PATH_KEY]: n for n in gm.graph.nodes if n.target is OPS.quantize.default
                  and n.meta.get(ROLE_KEY) == WEIGHT_QUANT}
        anns = {n.meta[PATH_KEY]: n.meta[ANNOT_KEY] for n in gm.graph.nodes
                if is_linear(n) and n.meta.get(ANNOT_KEY) is not None and n.meta[PATH_KEY] in qnodes}
        pairs = [p for p in facts(gm).require(SmoothPairs, self.name).pairs
                 if all(c in anns for c in p.consumers) and (p.kind == "norm" or p.source in anns)]
        comp = facts(gm).get(Compensation)
        comps = comp.entries if comp is not None else {}
        h, kv, hd = _heads(model)
        attn = {block_of(q, prefix): AttentionSpec(q, k, h, kv, hd)
                for q, k in attention_projections(gm)}
        out_quant = {}
        if self.kv_bits != 16:
            vspec = QuantSpec(bits=self.kv_bits, symmetric=self.act_symmetric, granularity="token",
                              dynamic=True)
            out_quant = {module_path(n.args[0]): vspec for n in gm.graph.nodes
                         if n.target is OPS.choose_qparams.default and n.meta.get(ROLE_KEY) == KV_QUANT
                         and is_linear(n.args[0])}
        wbits = min((a.weight.bits if not a.weight.balanced else 2) for a in anns.values())
        epochs = opts.epochs_for(wbits)
        windows = calibration_windows(ctx)
        block_pairs: dict[int, list[int]] = {}
        for i, p in enumerate(pairs):
            block_pairs.setdefault(block_of(p.consumers[0], prefix), []).append(i)
        stats: dict[int, dict] = {}

        def step(b, local, qblock, inputs, fp_block, fp_inputs):
            mine = {p: a for p, a in anns.items() if p.startswith(local)}
            idx = block_pairs.get(b, [])
            plan = BlockPlan(
                annotations=mine, pairs=[pairs[i] for i in idx],
                compensated={p: (get_tensor(gm, a_t), get_tensor(gm, b_t))
                             for p, (_, a_t, b_t) in comps.items() if p in mine},
                attention=attn.get(b), out_quant={p: s for p, s in out_quant.items() if p in mine},
                weights={name: get_tensor(gm, f"{ROOT}.{local}{name}").detach()
                         for name, _ in qblock.named_parameters()})
            res = train_block(b, local, qblock, inputs, fp_block, fp_inputs, plan, opts, epochs)
            for i, s in zip(idx, res.scales):
                fold_smoothing(gm, pairs[i], s)
            for path, (scale, zero) in res.grids.items():
                _, s_node, z_node, _, _ = qnodes[path].args
                set_buffer(gm, s_node.target, scale.float())
                set_buffer(gm, z_node.target, zero.float())
            for path, (a, bvec) in res.compensation.items():
                _, a_t, b_t = comps[path]
                set_buffer(gm, a_t, a.float())
                set_buffer(gm, b_t, bvec.float())
            stats[b] = res.stats

        run_blocks(model, windows, step, opts.batch_size, fp_chain=True, desc="abq")
        facts(gm).add(CalibrationStats(blocks=stats))
        return gm
