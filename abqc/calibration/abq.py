"""ABQ block calibration: train one decoder block's quantization on the DLC + AKL loss.

Per block (run by `engine.run_blocks` with the float chain), on a float copy whose
weights are the graph's current ones (already SmoothQuant-smoothed):

- every quantized linear becomes a `QLinear` (learnable clipping, straight-through
  rounding, per-token activation fake-quant);
- each smoothing pair gets a learnable scale ``s`` (starting at 1, i.e. at the
  SmoothQuant scales already folded), shared by its consumers (GQA: one per KV channel);
- the compensated linears (down_proj in the first/last blocks) learn ``a`` and ``b``;
- AdamW (fp32, weight decay 0) minimises DLC(q, fp, fp_q) (+ the two MSEs) + AKL, where
  `fp` is the float block on the float chain, `fp_q` the float block on the quantized
  chain, and AKL compares the explicit head-averaged softmax(QKᵀ) maps of the quantized
  and float blocks.

`train_block` returns what was learnt; the ABQ pass folds it into the graph.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LinearAnnotation, QuantSpec
from .abq_options import ABQOptions
from .blocks import BlockInput, run_block
from .engine import peak_rss_mb
from .losses import akl, attention_map, dlc, double_mse
from .qlinear import QLinear

log = logging.getLogger("abqc")


@dataclass
class AttentionSpec:
    """Where a block's attention scores come from, for the AKL map."""

    q_path: str
    k_path: str
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass
class BlockPlan:
    """What to learn in one block (module paths are model paths)."""

    annotations: dict[str, LinearAnnotation]
    pairs: list  # SmoothPair whose consumers are in this block
    compensated: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (a init, b init)
    attention: AttentionSpec | None
    out_quant: dict[str, QuantSpec] = field(default_factory=dict)  # path -> V (kv_bits) spec
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # local name -> graph tensor


@dataclass
class BlockResult:
    scales: list[torch.Tensor]  # per plan.pairs entry: the learnt relative scale
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (scale, zero)
    compensation: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (a, b)
    stats: dict


def _install(block: nn.Module, local: str, plan: BlockPlan, opts: ABQOptions):
    """Swap the block's quantized linears for QLinears; return them and the learnt params."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name in plan.weights:
                p.copy_(plan.weights[name].to(p.dtype))
    return _swap(block, local, plan, opts)


def _swap(block: nn.Module, local: str, plan: BlockPlan, opts: ABQOptions):
    qlins: dict[str, QLinear] = {}
    for path, ann in plan.annotations.items():
        name = path[len(local):]
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        q = QLinear(getattr(parent, attr), ann, opts.lwc_init, plan.out_quant.get(path))
        setattr(parent, attr, q)
        qlins[path] = q
    scales = []
    for pair in plan.pairs:
        s = nn.Parameter(torch.ones(pair.channels), requires_grad=opts.learn_smooth)
        scales.append(s)
        for c in pair.consumers:
            if pair.kind == "norm":
                qlins[c].in_div = s if pair.index is None else None
            qlins[c].cols.append((s, pair.index))
        if pair.kind == "linear":
            qlins[pair.source].rows = s
    for path, (a, b) in plan.compensated.items():
        qlins[path].comp_a = nn.Parameter(a.detach().float().clone())
        qlins[path].comp_b = nn.Parameter(b.detach().float().clone())
    return qlins, scales


def _to_rtn(qlins: dict, scales: list) -> None:
    """The learnt parameters at RTN on the block's weights as they come (SmoothQuant scales
    folded): no clipping (sigmoid(inf) = 1), relative smoothing scales 1, no compensation."""
    for q in qlins.values():
        q.u.fill_(math.inf)
        if q.l is not None:
            q.l.fill_(math.inf)
        if q.comp_a is not None:
            q.comp_a.zero_()
    for s in scales:
        s.fill_(1.0)


def _record(module: nn.Module, store: dict, key: str):
    return module.register_forward_hook(lambda m, a, out: store.__setitem__(key, out.detach()))


@torch.no_grad()
def _targets(fp_block, local, inputs, fp_inputs, attn: AttentionSpec | None):
    """Per batch: (fp_out, fp_out_q, fp attention map or None)."""
    out = []
    hooks, seen = [], {}
    if attn is not None:
        hooks = [_record(fp_block.get_submodule(attn.q_path[len(local):]), seen, "q"),
                 _record(fp_block.get_submodule(attn.k_path[len(local):]), seen, "k")]
    try:
        for fp_in, q_in in zip(fp_inputs, inputs):
            fp_out = run_block(fp_block, fp_in)
            amap = None
            if attn is not None:
                amap = attention_map(seen["q"], seen["k"], attn.n_heads, attn.n_kv_heads,
                                     attn.head_dim, fp_in.kwargs.get("position_embeddings"))
            out.append((fp_out, run_block(fp_block, q_in), amap))
    finally:
        for h in hooks:
            h.remove()
    return out


def train_block(index: int, local: str, qblock: nn.Module, inputs: list[BlockInput],
                fp_block: nn.Module, fp_inputs: list[BlockInput], plan: BlockPlan,
                opts: ABQOptions, epochs: int) -> BlockResult:
    """Learn smoothing, clipping and compensation for `qblock` in place (it stays quantized)."""
    t0 = time.perf_counter()
    use_akl = opts.akl and plan.attention is not None
    targets = _targets(fp_block, local, inputs, fp_inputs, plan.attention if use_akl else None)
    # reference: plain RTN (min/max grid, no smoothing, no compensation) on the source weights
    rtn_block = copy.deepcopy(qblock)
    rtn_plan = BlockPlan(plan.annotations, [], {}, plan.attention, plan.out_quant)
    rtn_qlins, _ = _swap(rtn_block, local, rtn_plan, ABQOptions(lwc_init=math.inf))
    qlins, scales = _install(qblock, local, plan, opts)
    if use_akl:
        use_akl = plan.attention.q_path in qlins and plan.attention.k_path in qlins
    groups = [{"params": [q.u for q in qlins.values()] + [q.l for q in qlins.values() if q.l is not None],
               "lr": opts.lwc_lr}]
    if opts.learn_smooth and scales:
        groups.append({"params": scales, "lr": opts.smooth_lr})
    comp = [p for q in qlins.values() if q.comp_a is not None for p in (q.comp_a, q.comp_b)]
    if comp:
        groups.append({"params": comp, "lr": opts.comp_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    learnt = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(opts.seed + index)

    def loss_of(i: int, block: nn.Module = qblock, lins: dict = qlins) -> torch.Tensor:
        if use_akl:
            qq, qk = lins[plan.attention.q_path], lins[plan.attention.k_path]
            qq.record = qk.record = True
        out = run_block(block, inputs[i])
        fp_out, fp_out_q, amap = targets[i]
        loss = out.new_zeros(())
        if opts.dlc:
            loss = loss + dlc(out, fp_out, fp_out_q)
        if opts.mse:
            loss = loss + double_mse(out, fp_out, fp_out_q)
        if use_akl:
            a = plan.attention
            loss = loss + akl(attention_map(qq.last_out, qk.last_out, a.n_heads, a.n_kv_heads,
                                            a.head_dim, inputs[i].kwargs.get("position_embeddings")), amap)
            qq.record = qk.record = False
            qq.last_out = qk.last_out = None
        return loss

    with torch.no_grad():
        rtn = sum(float(loss_of(i, rtn_block, rtn_qlins)) for i in range(len(inputs))) / len(inputs)
        del rtn_block, rtn_qlins
        init = sum(float(loss_of(i)) for i in range(len(inputs))) / len(inputs)
        start = [p.detach().clone() for p in learnt]
    last = init
    with torch.enable_grad():
        for ep in range(epochs):
            total = 0.0
            for i in torch.randperm(len(inputs), generator=gen).tolist():
                loss = loss_of(i)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"ABQ loss is {loss.item()} in block {index}, epoch {ep}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
            last = total / len(inputs)
            log.debug("abq block %d epoch %d loss %.5f", index, ep, last)
    def mean_loss() -> float:
        return sum(float(loss_of(i)) for i in range(len(inputs))) / len(inputs)

    with torch.no_grad():
        final, kept = mean_loss(), "trained"
        if final > init:  # training made this block worse: keep the starting point
            log.warning("abq block %d: trained loss %.5f above the start %.5f; kept the start",
                        index, final, init)
            for p, p0 in zip(learnt, start):
                p.copy_(p0)
            final, kept = init, "start"
        if opts.rtn_fallback:
            best = [p.detach().clone() for p in learnt]
            _to_rtn(qlins, scales)
            at_rtn = mean_loss()
            if at_rtn < final:  # the start (clipping at its init) and training both lose
                log.warning("abq block %d: loss %.5f above RTN's on the same weights %.5f; kept "
                            "RTN (no clipping, no learnt smoothing or compensation)",
                            index, final, at_rtn)
                final, kept = at_rtn, "rtn"
            else:
                for p, p0 in zip(learnt, best):
                    p.copy_(p0)
        for q in qlins.values():  # freeze: the block now runs as it will be folded
            q.requires_grad_(False)
    stats = {"loss_rtn": rtn, "loss_init": init, "loss_last_epoch": last, "loss_final": final,
             "kept": kept, "epochs": epochs, "seconds": time.perf_counter() - t0,
             "peak_rss_mb": peak_rss_mb()}
    log.info("abq block %d: loss %.5f -> %.5f (rtn %.5f; kept %s; %d epochs, %.1fs, peak %.0f MB)",
             index, init, final, rtn, kept, epochs, stats["seconds"], stats["peak_rss_mb"])
    return BlockResult(
        scales=[s.detach().clamp(min=1e-2).clone() for s in scales],
        grids={p: q.final_grid() for p, q in qlins.items()},
        compensation={p: (q.comp_a.detach().clone(), q.comp_b.detach().clone())
                      for p, q in qlins.items() if q.comp_a is not None},
        stats=stats)
