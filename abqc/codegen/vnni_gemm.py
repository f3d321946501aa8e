"""The ``vnni`` formulation for prefill (M > 1): a register block of rows x tokens.

Why: the GEMV kernel (`vnni.vnni`) walks one (token, row) dot product at a time, so every
token re-loads and re-decodes its tile's weights: about three vector operations per
``vpdpbusd``. Here each step of the K loop loads and decodes `n_tile` weight vectors and
`m_tile` activation vectors once and feeds `n_tile * m_tile` ``vpdpbusd`` from them, into as
many accumulators held in registers (4 x 4: 16 accumulators, 8 operands, under AVX-512's 32
registers). The weight layout and the activation codes are the GEMV kernel's, so one packed
weight serves both and the tuner picks per M bucket; the epilogue is the same expression
(`compute.group_term`), with its per-row operands loaded and widened once per row tile
(`row_constants`), so that both kernels, and torch, round every output the same way.

The accumulators are small local buffers. TVM would place them in its workspace heap, where
LLVM cannot keep them in registers; they are marked ``disable_lower_builtin`` (stack
allocations, which LLVM promotes) and the build turns off ``StorageRewrite``, which would
merge them and drop the mark (`BUILD_CONFIG`).

Rows are the parallel loop (each tile's weights stay in L1 while every token block passes);
token blocks run inside. A last, partial token block reads the last token again in its empty
slots and stores that token's (identical) result again: a branch on the token would let LLVM
sink each token's dot products into its branch, which undoes the interleaving and spills the
decoded weights (measured: 1.6x slower at K = 576).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .compute import KernelShape, group_term
from .vnni import (NP_ALIGN, _bcast, _dot, block_codes, check_shape, declare_args, hsum, hsum_many,
                   padded_n, storage_bits, vnni_kp, x_sum)

#: the pass configuration these kernels are built under (see the module docstring)
BUILD_CONFIG = {"tirx.disable_storage_rewrite": True}
#: (n_tile, m_tile) register blocks the tuner tries: accumulators + operands <= 32 registers
BLOCKS = ((4, 4), (8, 2), (4, 5), (2, 8))
#: the block used where the tuning log knows nothing
GEMM_DEFAULT = {"n_tile": 4, "m_tile": 4}
VECTOR_REGISTERS = 32


def _local(lanes: int, dtype: str):
    """A small register-promotable local buffer (see the module docstring)."""
    return T.alloc_local((lanes,), dtype, annotations={"disable_lower_builtin": True})


def vnni_gemm(shape: KernelShape, with_epilogue: bool = True, n_tile: int = GEMM_DEFAULT["n_tile"],
              m_tile: int = GEMM_DEFAULT["m_tile"]):
    """``main`` (accumulate + epilogue) or ``acc`` (int32 [M, N, 1], exact) with an
    `n_tile` x `m_tile` register block."""
    check_shape(shape)
    if NP_ALIGN % n_tile:
        raise ValueError(f"n_tile={n_tile} must divide {NP_ALIGN}")
    if m_tile < 1 or n_tile * m_tile + n_tile + m_tile > VECTOR_REGISTERS:
        raise ValueError(f"a {n_tile} x {m_tile} block needs {n_tile * m_tile + n_tile + m_tile} "
                         f"vector registers, more than AVX-512's {VECTOR_REGISTERS}")
    n, wbits = shape.n, shape.wbits
    sb = storage_bits(wbits)
    per, kp, bcodes = 8 // sb, vnni_kp(shape.k, wbits), block_codes(wbits)
    nblocks, nt, mt = kp // bcodes, n_tile, m_tile
    mask = tirx.Broadcast(tirx.const((1 << sb) - 1, "uint8"), 64)
    off = 128 if wbits == 8 else 0  # 8-bit codes are stored minus 128: add 128 * Σx back
    lanes16 = tirx.Ramp(0, 1, 16)

    with IRBuilder() as ib:
        with T.prim_func():
            B = declare_args(shape, with_epilogue)
            M, X, W = B["M"], B["x"], B["w"]
            with T.parallel(0, padded_n(n) // nt) as no:
                consts = row_constants(B, no * nt, nt, n) if with_epilogue else None
                with T.serial(0, (M + mt - 1) // mt) as mo:
                    acc = [[_local(16, "int32") for _ in range(mt)] for _ in range(nt)]
                    for r in range(nt):
                        for j in range(mt):
                            T.buffer_store(acc[r][j], tirx.Broadcast(tirx.const(0, "int32"), 16),
                                           [lanes16])
                    tokens = [tirx.min(mo * mt + j, M - 1) for j in range(mt)]
                    with T.serial(0, nblocks) as b:
                        for t in range(per):
                            wv = []
                            for r in range(nt):
                                w = W[no * nt + r, b, tirx.Ramp(0, 1, 64)]
                                if sb != 8:
                                    w = (w >> tirx.Broadcast(tirx.const(t * sb, "uint8"), 64)) & mask
                                wv.append(w)
                            xv = [X[tok, tirx.Ramp(b * bcodes + t * 64, 1, 64)] for tok in tokens]
                            for r in range(nt):
                                for j in range(mt):
                                    T.buffer_store(acc[r][j], _dot(acc[r][j][lanes16], xv[j], wv[r]),
                                                   [lanes16])
                    for j in range(mt):  # no branch on the token: LLVM would sink each token's
                        # dot products into it and lose the interleaving (see the module docstring)
                        sums = hsum_many([acc[r][j][lanes16] for r in range(nt)]) if nt > 1 \
                            else hsum(acc[0][j][lanes16])
                        store_rows(B, tokens[j], no * nt, sums, nt, n, consts, off, kp)
    return ib.get()


def row_constants(B: dict, row0, nt: int, n: int) -> tuple:
    """A row tile's epilogue operands ``s_w``, ``z_w``, ``Σw`` as float64 vectors of `nt`
    lanes, loaded and widened once before its token blocks. (Folding them into fewer
    per-token terms, ``y = s_x (s_w acc - P Σx - z_x Q)`` with ``P = s_w (z_w - off)`` and
    ``Q = s_w (Σw - K z_w)``, saves an operation or two a token but rounds products that
    `group_term` keeps exact, and LLVM contracts them into FMAs: the result is no longer
    the GEMV kernel's, nor reproducible in torch.) Rows past N (the padding) read row N - 1
    and are never stored."""
    rows = [tirx.min(row0 + r, n - 1) for r in range(nt)]

    def vec(values):
        return values[0] if nt == 1 else tirx.Shuffle(values, list(range(nt)))

    lanes = tirx.Ramp(0, 1, nt) if nt > 1 else 0
    out = []
    for name in ("sw", "zw", "sumw"):
        buf = _local(nt, "float64")
        T.buffer_store(buf, vec([tirx.Cast("float64", B[name][r, 0]) for r in rows]), [lanes])
        out.append(buf[lanes])
    return tuple(out)


def store_rows(B: dict, m, row0, sums, nt: int, n: int, consts: tuple | None, off: int, kp: int):
    """Store token `m`'s results for rows ``row0 .. row0 + nt`` from their int32 sums (a vector
    of `nt` lanes): one vector store where every row exists, else row by row. With `consts`
    (`row_constants`) the float epilogue, without it the exact accumulator (``acc``)."""
    OUT, with_epilogue = B["y"], consts is not None

    def lane(v, r):
        return v if nt == 1 else tirx.Shuffle([v], [r])

    def value(acc, c, lanes):
        if not with_epilogue:
            return acc + _bcast(off * x_sum(B["x"], m, kp), lanes) if off else acc
        f64 = "float64" if lanes == 1 else f"float64x{lanes}"
        sw, zw, sumw = c

        def bc(e):
            return _bcast(tirx.Cast("float64", e), lanes)
        sumx = B["sumx"][m, 0]
        acc64 = tirx.Cast(f64, acc + _bcast(off * sumx, lanes) if off else acc)  # int32: exact
        y = bc(B["sx"][m]) * group_term(acc64, bc(sumx), bc(B["zx"][m]), bc(B["kg"][0]), sw, zw, sumw)
        return tirx.Cast("float32" if lanes == 1 else f"float32x{lanes}", y)

    def by_row():
        for r in range(nt):
            with T.If(row0 + r < n):
                with T.Then():
                    c = tuple(lane(v, r) for v in consts) if with_epilogue else None
                    index = [m, row0 + r] if with_epilogue else [m, row0 + r, 0]
                    T.buffer_store(OUT, value(lane(sums, r), c, 1), index)

    if not with_epilogue or nt == 1:  # (``acc`` [M, N, 1] cannot take a vector store on N)
        by_row()
        return
    with T.If(row0 + nt <= n):
        with T.Then():
            T.buffer_store(OUT, value(sums, consts, nt), [m, tirx.Ramp(row0, 1, nt)])
        with T.Else():
            by_row()
