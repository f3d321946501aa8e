"""The ``unpack`` formulation: weights stored as packed integer codes, decoded to float
inside the kernel, and a register-blocked float multiply-accumulate over the tokens.

Why: on AVX2 (no VNNI, no AVX-512) float FMA outruns popcount and table gathers once
there are more than a few activation bits or tokens. Memory still holds only the packed
codes (``32 // wbits`` codes per int32 word, word-major ``[words, N]`` so that one vector
load, one uniform shift and one mask decode 8 output channels), the decode happens in
registers or in a per-tile panel, and the accumulator is the weight-only one:
``acc[m, n, g] = Σ_k x[m, k] q[n, k]`` then ``y = Σ_g s_w (acc - z_w Σx_g)``.

Activations come in as float: x itself (WxA16), or x fake-quantized per token (WxAy: the
integer grid's values ``s_x (q - z_x)``), so results equal the fake-quant reference up to
float32 rounding (this formulation is not bit-exact; bit-serial and lut are).

Schedule parameters: ``n_tile`` (output channels per vector block), ``m_tile`` (token rows
per register block; callers pad M to a multiple), ``decode`` (``"inline"``: codes decoded
in the inner loop, best for a few tokens; ``"panel"``: a [K, n_tile] panel decoded once per
tile and reused by every token, best for prefill), ``k_unroll``.
"""
from __future__ import annotations

from typing import Any

import torch
import tvm
import tvm.s_tir as s_tir
from tvm import te, tirx

from .compute import KernelShape, _epilogue

UNPACK_DEFAULT = {"n_tile": 16, "m_tile": 1, "decode": "inline", "k_unroll": 1}


def codes_per_word(bits: int) -> int:
    return 32 // bits


def code_words(kp: int, bits: int) -> int:
    return -(-kp // codes_per_word(bits))


def pack_codes(codes: torch.Tensor, bits: int, kp: int) -> torch.Tensor:
    """Codes [N, K] -> int32 [words, N]: code k of row n sits at bits ``(k % c) * bits`` of
    word ``k // c`` (c = 32 // bits); K is zero-padded to `kp` (zero codes add nothing)."""
    n, k = codes.shape
    c = codes_per_word(bits)
    words = code_words(kp, bits)
    full = torch.zeros(n, words * c, dtype=torch.int64)
    full[:, :k] = codes.to(torch.int64)
    shifts = (torch.arange(c, dtype=torch.int64) * bits).view(1, 1, c)
    packed = (full.view(n, words, c) << shifts).sum(-1)  # < 2^32
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)
    return packed.to(torch.int32).T.contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [words, N] -> codes uint8 [N, k]."""
    c = codes_per_word(bits)
    w = packed.T.to(torch.int64) & 0xFFFFFFFF  # [N, words], unsigned
    shifts = (torch.arange(c, dtype=torch.int64, device=packed.device) * bits).view(1, 1, c)
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(w.shape[0], -1)[:, :k].to(torch.uint8)


def unpack(shape: KernelShape, with_epilogue: bool = True, m_tile: int = 1):
    """acc[m, n, g] = Σ_k x[m, k] q[n, k] (q decoded from packed codes), then the
    weight-only epilogue. M = mt * m_tile (callers pad rows; no bounds checks inside)."""
    mt = te.var("mt")
    m = mt * m_tile
    kp, n, g_count, bits = shape.kp, shape.n, shape.groups, shape.wbits
    gsz = kp // g_count
    c = codes_per_word(bits)
    x = te.placeholder((m, kp), "float32", name="x")
    w = te.placeholder((code_words(kp, bits), n), "int32", name="Wc")
    mask = tirx.const((1 << bits) - 1, "int32")
    wd = te.compute((kp, n), lambda kk, b: ((w[kk // c, b] >> ((kk % c) * bits)) & mask)
                    .astype("float32"), name="wd")
    k = te.reduce_axis((0, gsz), "k")
    acc = te.compute((m, n, g_count), lambda a, b, g: te.sum(x[a, g * gsz + k] * wd[g * gsz + k, b],
                                                            axis=k), name="acc")
    if not with_epilogue:
        return te.create_prim_func([x, w, acc, mt])
    extra, y = _epilogue(acc, m, shape, weight_only=True)
    return te.create_prim_func([x, w, *extra, y, mt])


def schedule_unpack(func: tvm.tirx.PrimFunc, params: dict[str, Any], epilogue: bool = True
                    ) -> tvm.tirx.PrimFunc:
    p = {**UNPACK_DEFAULT, **params}
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    acc = sch.get_sblock("acc")
    wd = sch.get_sblock("wd")
    m, n, g, k = sch.get_loops(acc)
    no, ni = sch.split(n, [None, p["n_tile"]])
    mo, mi = sch.split(m, [None, p["m_tile"]])
    sch.reorder(no, mo, g, k, mi, ni)
    sch.parallel(no)
    if p["decode"] == "panel":
        sch.compute_at(wd, no)  # [K, n_tile] decoded once per parallel tile
    else:
        sch.compute_inline(wd)  # decoded in registers in the inner loop
    local = sch.cache_write(acc, 0, "local")  # [m_tile, n_tile, G] accumulators
    sch.reverse_compute_at(local, mo)
    if epilogue:
        for name in ("y64", "y"):
            sch.reverse_compute_at(sch.get_sblock(name), mo)
    sch.decompose_reduction(acc, k)
    loops = sch.get_loops(sch.get_sblock("acc_update") if _has(sch, "acc_update") else acc)
    sch.unroll(loops[-2])
    if p["k_unroll"] > 1:
        _, ki = sch.split(loops[-3], [None, p["k_unroll"]])
        sch.unroll(ki)
    return sch.mod["main"]


def _has(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - get_sblock raises a TVM error for unknown names
        return False
