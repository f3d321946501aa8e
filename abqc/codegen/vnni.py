"""The ``vnni`` formulation: exact integer WxAy (abits <= 8, per channel) on AVX-512 VNNI.

Why: ``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of
four products into an int32 lane, 64 multiply-adds per instruction with no saturation.
Bit-serial popcount costs wbits*abits passes and the table form needs shuffles TE cannot
emit; this costs one pass whatever the widths, while memory holds only the packed weight
bits: at 4096x4096 (M=1) W2A8..W4A8 run 2.3x faster than fbgemm's int8 GEMV, W8A8 1.3x
(bench/results/kernels.json).

Weight layout ``uint8 [NP, KB, 64]`` (NP = N padded to 16 rows, KB blocks of K): codes are
stored in ``sb`` = 1, 2, 4 or 8 bits (wbits 3 -> 4, 5..7 -> 8); byte ``j`` of block ``b``
holds, at bit ``t*sb``, the code of ``k = b*B + t*64 + j`` (B = 64 * 8 / sb codes per
block). One 64-byte load, one shift and one mask give the 64 codes that meet 64
consecutive activation bytes. Activations are the per-token codes (uint8, 0..2^abits-1),
K zero-padded to whole blocks. 8-bit weight codes do not fit the signed operand: they are
stored as ``code - 128`` and the kernel adds ``128 * Σx`` back, so the accumulator is
always the exact ``Σ_k xq[m, k] wq[n, k]``. The epilogue is the integer formulations'
(`compute.group_term`: float64, then float32), operation for operation.

Schedule parameters: ``n_tile`` (rows per tile, one vector store), ``chains`` (independent
accumulators per row); tiles run in parallel. With ``m_tile`` > 1 the same layout runs on the
prefill kernel (`vnni_gemm`: a register block of ``n_tile`` rows x ``m_tile`` tokens).
"""
from __future__ import annotations

import functools

import torch
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .compute import KernelShape, group_term

NP_ALIGN = 16  # rows are padded to a multiple of this (every n_tile divides it)
VNNI_DEFAULT = {"n_tile": 8, "chains": 1}
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


def packed_shape(n: int, k: int, wbits: int) -> tuple[int, int, int]:
    """The weight layout's shape [NP, KB, 64]."""
    return padded_n(n), vnni_kp(k, wbits) // block_codes(wbits), 64


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
        return (full & 0xFF).to(torch.uint8).view(packed_shape(n, k, wbits))
    blocks = full.view(packed_shape(n, k, wbits)[:2] + (per, 64))
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


def _dot(acc, xv, wv):
    """acc[16 x i32] += 4-way sums of xv[64 x u8] * wv[64 x s8] (one vpdpbusd)."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, xv, wv)


def _bcast(value, lanes: int):
    return value if lanes == 1 else tirx.Broadcast(value, lanes)


def check_shape(shape: KernelShape) -> None:
    """The vnni kernels take per-channel weights and integer activations of at most 8 bits."""
    if shape.group_size or shape.abits > 8:
        raise ValueError(f"vnni takes per-channel weights and abits <= 8, got group_size="
                         f"{shape.group_size}, abits={shape.abits}")


def declare_args(shape: KernelShape, with_epilogue: bool) -> dict:
    """The PrimFunc's arguments (inside ``T.prim_func()``): ``main`` takes activation codes,
    the packed weight, the per-token grid and sums, the per-row grid and sums, K and ``y``;
    ``acc`` (a test aid) the codes, the weight and the int32 accumulator [M, N, 1] as ``y``."""
    n, wbits = shape.n, shape.wbits
    T.func_name("main" if with_epilogue else "acc")
    T.func_attr({"tir.noalias": True})
    names = ("x", "w", "sx", "zx", "sumx", "sw", "zw", "sumw", "kg", "y") if with_epilogue \
        else ("x", "w", "y")
    h = {name: T.arg(name if name != "y" or with_epilogue else "c", T.handle()) for name in names}
    M = T.int32()
    B = {"M": M, "x": T.match_buffer(h["x"], (M, vnni_kp(shape.k, wbits)), "uint8"),
         "w": T.match_buffer(h["w"], packed_shape(n, shape.k, wbits), "uint8")}
    if not with_epilogue:
        B["y"] = T.match_buffer(h["y"], (M, n, 1), "int32")
        return B
    for name, shp, dt in (("sx", (M,), "float32"), ("zx", (M,), "float32"),
                          ("sumx", (M, 1), "int32"), ("sw", (n, 1), "float32"),
                          ("zw", (n, 1), "float32"), ("sumw", (n, 1), "int32"),
                          ("kg", (1,), "float32"), ("y", (M, n), "float32")):
        B[name] = T.match_buffer(h[name], shp, dt)
    return B


def epilogue(B: dict, m, rows: list, acc, off: int):
    """float32 ``s_x s_w (acc - z_w Σx - z_x Σw + K z_x z_w)`` (in float64, `group_term`'s
    tree) for token `m` and `rows` (one row: scalar; several: a vector over them); `acc` is
    int32 with the same lanes, without the 8-bit offset, which is added here (``off * Σx``)."""
    lanes = len(rows)
    f64 = "float64" if lanes == 1 else f"float64x{lanes}"

    def c64(e, bc=False):
        return tirx.Cast(f64, _bcast(e, lanes) if bc else e)

    def per_row(buf):  # [n, 1] buffers: a vector load is not allowed on the first axis
        if lanes == 1:
            return buf[rows[0], 0]
        return tirx.Shuffle([buf[r, 0] for r in rows], list(range(lanes)))

    SX, ZX, SUMX, KG = B["sx"], B["zx"], B["sumx"], B["kg"]
    acc64 = c64(acc + _bcast(off * SUMX[m, 0], lanes) if off else acc)
    sw, zw, sumw = per_row(B["sw"]), per_row(B["zw"]), per_row(B["sumw"])
    y64 = group_term(acc64, c64(SUMX[m, 0], True), c64(ZX[m], True), c64(KG[0], True),
                     c64(sw), c64(zw), c64(sumw))
    return tirx.Cast("float32" if lanes == 1 else f"float32x{lanes}", c64(SX[m], True) * y64)


def x_sum(X, m, kp: int):
    """Σ_k x[m, k] as an int32 expression (``acc`` adds the 8-bit offset with it; ``main`` is
    given the sums)."""
    ones = tirx.Broadcast(tirx.const(1, "uint8"), 64)
    acc = tirx.Broadcast(tirx.const(0, "int32"), 16)
    for k0 in range(0, kp, 64):
        acc = _dot(acc, X[m, tirx.Ramp(k0, 1, 64)], ones)
    return hsum(acc)


def hsum_many(vectors: list):
    """Lane sums of several int32x16 vectors (2, 4, 8 or 16 of them) as one vector, lane i the
    sum of ``vectors[i]``: a tree of two-vector shuffles and adds (a few instructions per
    vector instead of `hsum`'s fifteen)."""
    count = len(vectors)
    if count & (count - 1) or not 1 < count <= 16:
        raise ValueError(f"hsum_many takes 2, 4, 8 or 16 vectors, got {count}")
    level, group = list(vectors), 16  # each vector: 16 // group groups of `group` partial sums
    while len(level) > 1:
        half, groups = group // 2, 16 // group
        lo = [g * group + t for g in range(groups) for t in range(half)]
        hi = [i + half for i in lo]
        lo, hi = lo + [16 + i for i in lo], hi + [16 + i for i in hi]
        level = [tirx.Shuffle([a, b], lo) + tirx.Shuffle([a, b], hi)
                 for a, b in zip(level[::2], level[1::2])]
        group = half
    v = level[0]
    while group > 1:  # one vector: `count` groups, each summed in place
        half = group // 2
        lo = [g * group + t for g in range(count) for t in range(half)]
        v = tirx.Shuffle([v], lo) + tirx.Shuffle([v], [i + half for i in lo])
        group = half
    return v


def hsum(v):
    """The sum of an int32x16 vector's lanes."""
    total = tirx.Shuffle([v], [0])
    for lane in range(1, 16):
        total = total + tirx.Shuffle([v], [lane])
    return total


def vnni(shape: KernelShape, with_epilogue: bool = True, n_tile: int = VNNI_DEFAULT["n_tile"],
         chains: int = 1):
    """``acc`` [M, N, 1] int32 (exact), or ``main``: the accumulator and the epilogue.

    Built with TVM's IR builder rather than TVMScript: each tile's whole K reduction is one
    expression (nested ``vpdpbusd`` calls, `chains` independent ones per row), so the
    accumulators live in registers. It is fully unrolled: code grows with K (seconds to build
    at K = 4096, up to a minute at 11008). (A plain local buffer would sit in TVM's workspace
    heap, loaded and stored around every instruction; `vnni_gemm` shows how to keep one in
    registers.) Tokens run one at a time: for M > 1 the tuner also tries `vnni_gemm`, which
    reuses each decoded weight over a block of tokens.
    ``main``'s full tiles store `n_tile` outputs as one vector, the last, partial tile (and
    ``acc``, a test aid) row by row.
    """
    check_shape(shape)
    if NP_ALIGN % n_tile:
        raise ValueError(f"n_tile={n_tile} must divide {NP_ALIGN}; use one of {N_TILES}")
    n, wbits = shape.n, shape.wbits
    sb = storage_bits(wbits)
    per, kp = 8 // sb, vnni_kp(shape.k, wbits)
    bcodes, np_ = block_codes(wbits), padded_n(n)
    nblocks, nt = kp // bcodes, n_tile
    mask = (1 << sb) - 1
    off = 128 if wbits == 8 else 0  # 8-bit codes are stored minus 128: add 128 * Σx back

    def xvec(X, m, b, t):
        return X[m, tirx.Ramp(b * bcodes + t * 64, 1, 64)]

    def row_acc(X, W, m, row):
        """Σ_k x[m, k] w_stored[row, k] as an int32 expression."""
        accs = [tirx.Broadcast(tirx.const(0, "int32"), 16) for _ in range(chains)]
        step = 0
        for b in range(nblocks):
            wv = W[row, b, tirx.Ramp(0, 1, 64)]
            for t in range(per):
                wt = wv if sb == 8 else (wv >> tirx.Broadcast(tirx.const(t * sb, "uint8"), 64)) \
                    & tirx.Broadcast(tirx.const(mask, "uint8"), 64)
                accs[step % chains] = _dot(accs[step % chains], xvec(X, m, b, t), wt)
                step += 1
        acc = accs[0]
        for a in accs[1:]:
            acc = acc + a
        return hsum(acc)

    def tile_acc(X, W, m, no):
        return tirx.Shuffle([row_acc(X, W, m, no * nt + r) for r in range(nt)], list(range(nt)))

    def rows(lanes, no, r=0):
        return tirx.Ramp(no * nt, 1, lanes) if lanes > 1 else no * nt + r

    with IRBuilder() as ib:
        with T.prim_func():
            B = declare_args(shape, with_epilogue)
            M, X, W, OUT = B["M"], B["x"], B["w"], B["y"]

            def result(m, no, acc, lanes, r=0):
                if not with_epilogue:
                    return acc + _bcast(off * x_sum(X, m, kp), lanes) if off else acc
                rows_ = [no * nt + r] if lanes == 1 else [no * nt + i for i in range(lanes)]
                return epilogue(B, m, rows_, acc, off)

            def store(m, j, value):
                T.buffer_store(OUT, value, [m, j] if with_epilogue else [m, j, 0])

            with T.parallel(0, np_ // nt) as no:
                with T.serial(0, M) as m:
                    def by_row():
                        for r in range(nt):
                            with T.If(no * nt + r < n):
                                with T.Then():
                                    store(m, no * nt + r, result(m, no, row_acc(X, W, m, no * nt + r), 1, r))

                    if not with_epilogue:  # (``acc`` [M, N, 1] cannot take a vector store on N)
                        by_row()
                    else:
                        with T.If(no * nt + nt <= n):
                            with T.Then():
                                store(m, rows(nt, no), result(m, no, tile_acc(X, W, m, no), nt))
                            with T.Else():
                                by_row()
    return ib.get()
