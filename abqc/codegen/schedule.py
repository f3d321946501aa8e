"""Schedule templates: how a kernel's loops are tiled, ordered, unrolled and parallelised.

A schedule is a small dict of named parameters (what the tuner searches and the tuning
log records). Loops of the accumulator block are ``m, n, g`` then the reduction axes
(bitserial: ``i, j, k``; table kernels: ``j, k``):

- ``n_tile``: outputs per inner tile (the tile's weights stay in cache while k streams);
- ``order``: ``"k_inner"`` (a whole dot product per output, k innermost so LLVM vectorises
  the reduction), ``"bits_inner"`` (k outside the bit-pair loops, each loaded word reused
  for all bit pairs, bit loops unrolled) or ``"n_inner"`` (reductions outside, the tile's
  outputs innermost, left to LLVM's vectoriser);
- ``m_outer``: tokens outside the n tiles (the (m, n-tile) pairs are the parallel loop) or,
  when false, inside each parallel n tile (a tile's weights are reused by every token).
The epilogue is computed inside each tile (the accumulator never exists at full size).
"""
from __future__ import annotations

from typing import Any

import tvm
import tvm.s_tir as s_tir

ORDERS = ("k_inner", "bits_inner", "n_inner")


def apply(sch: s_tir.Schedule, params: dict[str, Any], epilogue: bool) -> None:
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    m, n, g, *red = loops
    no, ni = sch.split(n, [None, params["n_tile"]])
    order = params["order"]
    k = red[-1]
    bits = red[:-1]
    m_outer = params.get("m_outer", True)
    outer = [m, no] if m_outer else [no, m]
    if order == "k_inner":
        sch.reorder(*outer, ni, g, *bits, k)
    elif order == "bits_inner":
        sch.reorder(*outer, ni, g, k, *bits)
        for b in bits:
            sch.unroll(b)
    elif order == "n_inner":
        sch.reorder(*outer, g, *bits, k, ni)
    else:
        raise ValueError(f"order={order!r} is not one of {ORDERS}")
    par = sch.fuse(m, no) if m_outer else no
    sch.parallel(par)
    if epilogue:
        for name in ("y64", "y"):
            sch.reverse_compute_at(sch.get_sblock(name), par)
    if order == "n_inner":  # hoist the init so the inner n loop is a plain update LLVM vectorises
        sch.decompose_reduction(acc, g)


def schedule(func: tvm.tirx.PrimFunc, params: dict[str, Any], epilogue: bool) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    apply(sch, params, epilogue)
    return sch.mod["main"]
