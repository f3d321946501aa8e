"""The ``vnni`` formulation: exact integer WxAy (abits <= 8, per channel) on AVX-512 VNNI.

Why: ``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of
four products into an int32 lane, 64 multiply-adds per instruction with no saturation.
Bit-serial popcount costs wbits*abits passes and the table form needs shuffles TE cannot
emit; this costs one pass whatever the widths, while memory still holds only the packed
weight bits, so it beats int8 GEMV (fbgemm) by reading 2-4x fewer weight bytes.

Weight layout ``uint8 [NP, KB, 64]`` (NP = N padded to 16 rows, KB blocks of K): codes are
stored in ``sb`` = 1, 2, 4 or 8 bits (wbits 3 -> 4, 5..7 -> 8); byte ``j`` of block ``b``
holds, at bit ``t*sb``, the code of ``k = b*B + t*64 + j`` (B = 64 * 8 / sb codes per
block). One 64-byte load, one shift and one mask give the 64 codes that meet 64
consecutive activation bytes. Activations are the per-token codes (uint8, 0..2^abits-1),
K zero-padded to whole blocks. 8-bit weight codes do not fit the signed operand: they are
stored as ``code - 128`` and the kernel adds ``128 * Σx`` back, so the accumulator is
always the exact ``Σ_k xq[m, k] wq[n, k]``. The epilogue is the integer formulations'
(float64, then float32).

Schedule parameter: ``n_tile`` (rows sharing each activation load; accumulators stay in
registers), tiles run in parallel.
"""
from __future__ import annotations

import functools

import torch
from tvm.script import tirx as T

from .compute import KernelShape

NP_ALIGN = 16  # rows are padded to a multiple of this (every n_tile divides it)
VNNI_DEFAULT = {"n_tile": 8}
N_TILES = (4, 8, 16)


@functools.lru_cache(maxsize=1)
def vnni_supported() -> bool:
    """Whether this CPU has AVX-512 VNNI (and BW for the byte shifts)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_vnni" in flags and " avx512bw" in flags


def storage_bits(wbits: int) -> int:
    return next(b for b in (1, 2, 4, 8) if b >= wbits)


def block_codes(wbits: int) -> int:
    """Codes per 64-byte block."""
    return 64 * 8 // storage_bits(wbits)


def vnni_kp(k: int, wbits: int) -> int:
    """K padded to whole blocks."""
    b = block_codes(wbits)
    return -(-k // b) * b


def padded_n(n: int) -> int:
    return -(-n // NP_ALIGN) * NP_ALIGN


def pack_vnni(codes: torch.Tensor, wbits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> uint8 [NP, KB, 64] (see the module docstring)."""
    n, k = codes.shape
    sb = storage_bits(wbits)
    per, kp = 8 // sb, vnni_kp(k, wbits)
    full = torch.zeros(padded_n(n), kp, dtype=torch.int32)
    full[:n, :k] = codes.to(torch.int32)
    if wbits == 8:
        full[:n] -= 128  # the signed operand; pad rows stay 0 (never read into outputs)
        full[:n, k:] = 0
        return (full & 0xFF).to(torch.uint8).view(full.shape[0], kp // 64, 64)
    blocks = full.view(full.shape[0], kp // (64 * per), per, 64)
    shifts = (torch.arange(per, dtype=torch.int32) * sb).view(1, 1, per, 1)
    return (blocks << shifts).sum(2).to(torch.uint8)


def unpack_vnni(packed: torch.Tensor, wbits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of `pack_vnni`: codes uint8 [N, K]."""
    sb = storage_bits(wbits)
    per = 8 // sb
    p = packed[:n].to(torch.int32)
    if wbits == 8:
        return ((p.reshape(n, -1) + 128) & 0xFF)[:, :k].to(torch.uint8)
    shifts = (torch.arange(per, dtype=torch.int32) * sb).view(1, 1, per, 1)
    codes = (p.unsqueeze(2) >> shifts) & ((1 << sb) - 1)  # [n, KB, per, 64]
    return codes.reshape(n, -1)[:, :k].to(torch.uint8)


def vnni(shape: KernelShape, with_epilogue: bool = True, n_tile: int = VNNI_DEFAULT["n_tile"]):
    """``acc`` [M, N, 1] int32 (exact), or ``main``: the accumulator and the epilogue."""
    if shape.group_size or shape.abits > 8:
        raise ValueError(f"vnni takes per-channel weights and abits <= 8, got group_size="
                         f"{shape.group_size}, abits={shape.abits}")
    if NP_ALIGN % n_tile:
        raise ValueError(f"n_tile={n_tile} must divide {NP_ALIGN}; use one of {N_TILES}")
    n, wbits = shape.n, shape.wbits
    sb = storage_bits(wbits)
    per, kp = 8 // sb, vnni_kp(shape.k, wbits)
    bcodes, np_ = block_codes(wbits), padded_n(n)
    nblocks = kp // bcodes
    tiles, nt = np_ // n_tile, n_tile
    signed8 = wbits == 8
    mask = (1 << sb) - 1

    def dot(acc, xv, wv):
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, xv, wv)

    # The two prim funcs share the accumulation (TVMScript cannot call a helper body), so
    # it is written once as a Python macro.
    @T.macro
    def accumulate(X, W, m, no, accv):
        for r in T.unroll(nt):
            accv[T.ramp(r * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
        for b in range(nblocks):
            for t in T.unroll(per):  # (8-bit codes: per = 1, shift 0, mask 0xFF: no decoding)
                for r in T.unroll(nt):
                    accv[T.ramp(r * 16, 1, 16)] = dot(
                        accv[T.ramp(r * 16, 1, 16)], X[m, T.ramp(b * bcodes + t * 64, 1, 64)],
                        (W[no * nt + r, b, T.ramp(0, 1, 64)] >> T.broadcast(T.uint8(t * sb), 64))
                        & T.broadcast(T.uint8(mask), 64))

    @T.macro
    def lane_sum(accv, r, out):
        out[0] = 0
        for lane in T.unroll(16):
            out[0] = out[0] + accv[r * 16 + lane]

    sum_k = kp if signed8 else 0
    off = 128 if signed8 else 0  # 8-bit codes are stored minus 128: add 128 * Σx back

    @T.prim_func
    def acc_fn(x: T.handle, w: T.handle, c: T.handle):
        T.func_attr({"tir.noalias": True})
        M = T.int32()
        X = T.match_buffer(x, (M, kp), "uint8")
        W = T.match_buffer(w, (np_, nblocks, 64), "uint8")
        C = T.match_buffer(c, (M, n, 1), "int32")
        for no in T.parallel(tiles):
            for m in range(M):
                accv = T.alloc_buffer((nt * 16,), "int32", scope="local")
                tot = T.alloc_buffer((1,), "int32", scope="local")
                xs = T.alloc_buffer((1,), "int32", scope="local")
                xs[0] = 0
                for kk in range(sum_k):  # Σx, for the 8-bit offset only
                    xs[0] = xs[0] + T.Cast("int32", X[m, kk])
                accumulate(X, W, m, no, accv)
                for r in range(nt):
                    if no * nt + r < n:
                        lane_sum(accv, r, tot)
                        C[m, no * nt + r, 0] = tot[0] + off * xs[0]

    @T.prim_func
    def main_fn(x: T.handle, w: T.handle, sx_: T.handle, zx_: T.handle, sumx_: T.handle,
                sw_: T.handle, zw_: T.handle, sumw_: T.handle, kg_: T.handle, y_: T.handle):
        T.func_attr({"tir.noalias": True})
        M = T.int32()
        X = T.match_buffer(x, (M, kp), "uint8")
        W = T.match_buffer(w, (np_, nblocks, 64), "uint8")
        SX = T.match_buffer(sx_, (M,), "float32")
        ZX = T.match_buffer(zx_, (M,), "float32")
        SUMX = T.match_buffer(sumx_, (M, 1), "int32")
        SW = T.match_buffer(sw_, (n, 1), "float32")
        ZW = T.match_buffer(zw_, (n, 1), "float32")
        SUMW = T.match_buffer(sumw_, (n, 1), "int32")
        KG = T.match_buffer(kg_, (1,), "float32")
        Y = T.match_buffer(y_, (M, n), "float32")
        for no in T.parallel(tiles):
            for m in range(M):
                accv = T.alloc_buffer((nt * 16,), "int32", scope="local")
                tot = T.alloc_buffer((1,), "int32", scope="local")
                accumulate(X, W, m, no, accv)
                for r in range(nt):
                    if no * nt + r < n:
                        lane_sum(accv, r, tot)
                        j = no * nt + r
                        acc = T.Cast("float64", tot[0] + off * SUMX[m, 0])
                        y64 = T.Cast("float64", SW[j, 0]) * (
                            acc - T.Cast("float64", ZW[j, 0]) * T.Cast("float64", SUMX[m, 0])
                            - T.Cast("float64", ZX[m]) * T.Cast("float64", SUMW[j, 0])
                            + T.Cast("float64", KG[0]) * T.Cast("float64", ZX[m]) * T.Cast("float64", ZW[j, 0]))
                        Y[m, j] = T.Cast("float32", T.Cast("float64", SX[m]) * y64)

    return main_fn if with_epilogue else acc_fn
