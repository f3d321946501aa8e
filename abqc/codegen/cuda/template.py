"""The b1 tensor-core kernel as TensorIR, generated from Python for one problem + schedule.

Why generated rather than scheduled: in the apache-tvm 0.27.0.post1 wheel
``Schedule.tensorize`` segfaults (inside tvm_ffi, also with TVM's own registered mma
intrinsics), so the blockize/tensorize route cannot be used. The kernel is therefore
written with TVM's IR builder: the same TensorIR statements a tensorized schedule would
lower to (shared-memory stages, ``cp.async`` pipeline, per-lane fragment loads, the PTX
``mma ... b1.b1.s32.and.popc`` builtin, fragment stores), with the loop structure and
tile sizes taken from `CudaSchedule`. The fragment layouts are those of the registered
intrinsics in `intrin` (``operand_index`` / ``acc_index``).

``emulate=True`` builds the same index arithmetic for LLVM: thread launches become serial
loops (one per barrier-separated phase), per-thread registers get a thread dimension,
``cp.async`` becomes a plain copy, and each warp's MMA is replaced by the PTX-defined
fragment semantics, so a CPU test checks every address the GPU kernel computes.

Dataflow of one thread block (GEMM: a bm x bn output tile; decode: all M tokens):
  X[planes, rows, kw] and W[wbits, n, kw] (int32 words of bit planes) --stages--> shared
  -> per-lane fragments -> m8n8k128 MMAs into the warp's 8x8 int32 tiles (one tile per
  (activation plane, token block) x (weight plane, output block)) -> shared partials
  -> Σ_ij 2^(i+j) partial -> dequantization epilogue -> fp16/fp32 y.
"""
from __future__ import annotations

import contextlib

import tvm
from tvm import tirx
from tvm.script import tirx as TS
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .intrin import acc_index, operand_index
from .space import (MMA_KW, MMA_M, MMA_N, CudaProblem, CudaSchedule, check, kw_words, n_padded,
                    smem_row_words, tile_rows)

WARP = 32


def _ptr_var(name: str, dtype: str = "int32"):
    """A named data pointer, so the CUDA kernel's parameter is ``<name>_ptr`` (launch.py
    binds arguments by these names)."""
    return tirx.Var(name, tvm.ir.PointerType(tvm.ir.PrimType(dtype)))


def _unravel(buf, flat):
    """Indices of row-major element `flat` in `buf` (argument buffers keep their shape, so
    their kernel parameters keep their names)."""
    idx = []
    for extent in reversed(buf.shape[1:]):
        idx.append(tirx.floormod(flat, extent))
        flat = tirx.floordiv(flat, extent)
    return [flat, *reversed(idx)]


def _f64(e):
    return tirx.Cast("float64", e)


@contextlib.contextmanager
def _guard(cond):
    """``if cond:`` around the body, or nothing when cond is None (statically true)."""
    if cond is None:
        yield
        return
    with T.If(cond):
        with T.Then():
            yield


class _Emitter:
    """GPU vs emulation differences: thread phases, per-thread registers, barriers, copies."""

    def __init__(self, emulate: bool, threads: int):
        self.emulate, self.threads = emulate, threads
        self.tx = None  # GPU: the threadIdx.x var, bound once for the whole kernel

    @contextlib.contextmanager
    def phase(self):
        """One barrier-separated stretch of per-thread code; yields the thread id."""
        if self.emulate:
            with T.serial(0, self.threads) as t:
                yield t
        else:
            yield self.tx

    def regs(self, n: int, dtype: str = "int32"):
        shape = (self.threads, n) if self.emulate else (n,)
        return T.alloc_buffer(shape, dtype, scope="global" if self.emulate else "local")

    def reg_index(self, t, i):
        return [t, i] if self.emulate else [i]

    def sync(self):
        if not self.emulate:
            T.evaluate(TS.tvm_storage_sync("shared"))

    def copy16(self, dst, dst_off, src, src_off, asynchronous: bool):
        """Copy 4 int32 words (16 bytes) global -> shared."""
        if asynchronous and not self.emulate:
            T.evaluate(TS.ptx["cp.async.cg.shared.global"](
                dst.access_ptr("w", offset=dst_off), src.access_ptr("r", offset=src_off), 16))
        else:
            for q in range(MMA_KW):
                T.buffer_store(dst, src[_unravel(src, src_off + q)], [dst_off + q])

    def commit(self):
        if not self.emulate:
            T.evaluate(TS.ptx["cp.async.commit_group"]())

    def wait(self, pending: int):
        if not self.emulate:
            T.evaluate(TS.ptx["cp.async.wait_group"](pending))


def build_func(p: CudaProblem, s: CudaSchedule, epilogue: bool = True, emulate: bool = False):
    """The kernel as a PrimFunc. Arguments (all contiguous):

    X int32 [planes, rows, KW] (GEMM: [abits, M padded to bm, KW]; decode: [1, rows, KW],
    rows = abits*M padded to 8, row i*M+m holding plane i of token m), W int32
    [wbits, N padded to bn, KW]; with the epilogue then sx, zx float32 [M'], sumx int32 [M'],
    sw, zw float32 [Np], sumw int32 [Np], kg float32 [1] (real K) and y [M', Np]
    (out_dtype); without it acc int32 [M', Np]. M' is the padded M (GEMM) or M (decode).
    """
    check(p, s)
    planes, rows = tile_rows(p, s)
    kw, np_ = kw_words(p, s), n_padded(p, s)
    bn, bk, stages = s.bn, s.bk, s.stages
    row_tiles, col_tiles = planes * rows // MMA_M, p.wbits * bn // MMA_N
    rtw, ctw = row_tiles // s.warps_m, col_tiles // s.warps_n
    nthreads = s.threads
    ko_count = kw // bk
    ld = smem_row_words(bk)  # padded shared row: conflict-free fragment loads
    x_stage, w_stage = planes * rows * ld, p.wbits * bn * ld
    prow = p.wbits * bn  # partials row length
    decode = bool(p.decode_m)
    out_rows = p.decode_m if decode else s.bm
    em = _Emitter(emulate, nthreads)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("main" if epilogue else "acc")
            mrows = tirx.Var("mrows", "int32")
            x_rows = rows if decode else mrows
            y_rows = p.decode_m if decode else mrows
            X = T.arg("X", T.buffer((planes, x_rows, kw), "int32", data=_ptr_var("X"), buffer_name="X"))
            W = T.arg("W", T.buffer((p.wbits, np_, kw), "int32", data=_ptr_var("W"), buffer_name="W"))
            if epilogue:
                sx = T.arg("sx", T.buffer((y_rows,), "float32", buffer_name="sx"))
                zx = T.arg("zx", T.buffer((y_rows,), "float32", buffer_name="zx"))
                sumx = T.arg("sumx", T.buffer((y_rows,), "int32", buffer_name="sumx"))
                sw = T.arg("sw", T.buffer((np_,), "float32", buffer_name="sw"))
                zw = T.arg("zw", T.buffer((np_,), "float32", buffer_name="zw"))
                sumw = T.arg("sumw", T.buffer((np_,), "int32", buffer_name="sumw"))
                kg = T.arg("kg", T.buffer((1,), "float32", buffer_name="kg"))
                Y = T.arg("y", T.buffer((y_rows, np_), p.out_dtype, buffer_name="y"))
            else:
                Y = T.arg("acc", T.buffer((y_rows, np_), "int32", buffer_name="acc"))
            T.func_attr({"tirx.noalias": True})

            with contextlib.ExitStack() as stack:
                m_blocks = 1 if decode else tirx.floordiv(mrows, s.bm)
                if emulate:
                    bx = stack.enter_context(T.serial(0, np_ // bn))
                    by = stack.enter_context(T.serial(0, m_blocks))
                else:
                    bx_iv, by_iv = T.env_thread("blockIdx.x"), T.env_thread("blockIdx.y")
                    stack.enter_context(T.launch_thread(bx_iv, np_ // bn))
                    stack.enter_context(T.launch_thread(by_iv, m_blocks))
                    tx_iv = T.env_thread("threadIdx.x")
                    stack.enter_context(T.launch_thread(tx_iv, nthreads))
                    bx, by, em.tx = bx_iv, by_iv, tx_iv
                smem = "global" if emulate else "shared"
                Xs = T.alloc_buffer((stages * x_stage,), "int32", scope=smem, align=16)
                Ws = T.alloc_buffer((stages * w_stage,), "int32", scope=smem, align=16)
                Ps = T.alloc_buffer((planes * rows * prow,), "int32", scope=smem, align=16)
                a_frag = em.regs(rtw)
                b_frag = em.regs(ctw)
                c_frag = em.regs(rtw * ctw * 2)
                row0 = 0 if decode else by * s.bm

                def load_stage(t, slot, ko):
                    """Global -> shared for K stage `ko` into buffer `slot` (16-byte chunks)."""
                    for buf, gbuf, count, per_plane, plane_rows, stage_len, base_row in (
                            (Xs, X, planes * rows * bk // 4, rows, x_rows, x_stage, row0),
                            (Ws, W, p.wbits * bn * bk // 4, bn, np_, w_stage, bx * bn)):
                        chunks_per_row = bk // 4
                        for it in range(-(-count // nthreads)):
                            idx = it * nthreads + t
                            e, q = idx // chunks_per_row, idx % chunks_per_row
                            plane, r = e // per_plane, e % per_plane
                            src = ((plane * plane_rows + base_row + r) * kw + ko * bk + q * 4)
                            dst = slot * stage_len + e * ld + q * 4
                            with _guard(idx < count if (it + 1) * nthreads > count else None):
                                em.copy16(buf, dst, gbuf, src, stages > 1)

                def warp_coords(t):
                    warp, lane = t // WARP, t % WARP
                    return warp // s.warps_n, warp % s.warps_n, lane

                def compute_stage(slot):
                    """All MMAs of one K stage: fragment loads then m8n8k128 per tile pair."""
                    with T.serial(0, bk // MMA_KW) as kk:
                        with em.phase() as t:
                            wm, wn, lane = warp_coords(t)
                            for a_ in range(rtw):
                                rt = wm * rtw + a_
                                T.buffer_store(a_frag, Xs[slot * x_stage + (rt * MMA_M + lane // 4) * ld
                                                          + kk * MMA_KW + lane % 4], em.reg_index(t, a_))
                            for b_ in range(ctw):
                                ct = wn * ctw + b_
                                T.buffer_store(b_frag, Ws[slot * w_stage + (ct * MMA_N + lane // 4) * ld
                                                          + kk * MMA_KW + lane % 4], em.reg_index(t, b_))
                            if not emulate:
                                for a_ in range(rtw):
                                    for b_ in range(ctw):
                                        T.evaluate(TS.ptx_legacy.mma(
                                            "m8n8k128", "row", "col", "int1", "int1", "int32",
                                            a_frag.data, a_, b_frag.data, b_, c_frag.data,
                                            (a_ * ctw + b_) * 2, False, "and", dtype="int32"))
                        if emulate:
                            _emulate_mma(a_frag, b_frag, c_frag, nthreads // WARP, rtw, ctw)

                # zero the accumulators
                with em.phase() as t:
                    for i in range(rtw * ctw * 2):
                        T.buffer_store(c_frag, 0, em.reg_index(t, i))
                if stages == 1:
                    with T.serial(0, ko_count) as ko:
                        em.sync()
                        with em.phase() as t:
                            load_stage(t, 0, ko)
                        em.sync()
                        compute_stage(0)
                else:  # emulation runs the same order with synchronous copies

                    with em.phase() as t:
                        for st in range(stages - 1):
                            if st < ko_count:
                                load_stage(t, st, st)
                            em.commit()
                    with T.serial(0, ko_count) as ko:
                        em.wait(stages - 2)
                        em.sync()
                        nxt = ko + stages - 1
                        with em.phase() as t:
                            with T.If(nxt < ko_count):
                                with T.Then():
                                    load_stage(t, nxt % stages, nxt)
                            em.commit()
                        compute_stage(ko % stages)
                    em.wait(0)
                em.sync()  # the partials may reuse the stages' shared memory (storage rewrite)
                # fragments -> shared partials [planes*rows, wbits*bn]
                with em.phase() as t:
                    wm, wn, lane = warp_coords(t)
                    for a_ in range(rtw):
                        for b_ in range(ctw):
                            rt, ct = wm * rtw + a_, wn * ctw + b_
                            for q in range(2):
                                # lane holds C(row, col) with (lane, q) == acc_index(row, col)
                                r8, c8 = lane // 4, (lane % 4) * 2 + q
                                T.buffer_store(Ps, c_frag[tuple(em.reg_index(t, (a_ * ctw + b_) * 2 + q))],
                                               [(rt * MMA_M + r8) * prow + ct * MMA_N + c8])
                em.sync()
                # Σ_ij 2^(i+j) partial, then the epilogue
                count = out_rows * bn
                with em.phase() as t:
                    for it in range(-(-count // nthreads)):
                        o = it * nthreads + t
                        ml, nl = o // bn, o % bn
                        body = _reduce_and_store(p, Ps, ml, nl, rows, prow, bn)
                        m_glob = ml if decode else row0 + ml
                        n_glob = bx * bn + nl
                        with _guard(o < count if (it + 1) * nthreads > count else None):
                            if epilogue:
                                zxm, zwn = _f64(zx[m_glob]), _f64(zw[n_glob])
                                val = _f64(sx[m_glob]) * _f64(sw[n_glob]) * (
                                    _f64(body) - zwn * _f64(sumx[m_glob]) - zxm * _f64(sumw[n_glob])
                                    + _f64(kg[0]) * zxm * zwn)
                                T.buffer_store(Y, tirx.Cast(p.out_dtype, val), [m_glob, n_glob])
                            else:
                                T.buffer_store(Y, body, [m_glob, n_glob])
    return ib.get()


def _reduce_and_store(p: CudaProblem, Ps, ml, nl, rows, prow, bn):
    """Σ_i Σ_j partial[(plane i, token ml), (plane j, output nl)] << (i + j)."""
    total = None
    for i in range(p.abits):
        row = (i * p.decode_m + ml) if p.decode_m else (i * rows + ml)
        for j in range(p.wbits):
            term = Ps[row * prow + j * bn + nl]
            if i + j:
                term = tirx.shift_left(term, tirx.const(i + j, "int32"))
            total = term if total is None else total + term
    return total


def _emulate_mma(a_frag, b_frag, c_frag, warps, rtw, ctw):
    """PTX m8n8k128 b1 .and.popc semantics on per-lane fragments (CPU emulation only)."""
    with T.serial(0, warps) as w:
        with T.grid(rtw, ctw, WARP, 2) as (a_, b_, lane, q):
            r, c = lane // 4, (lane % 4) * 2 + q
            lane_c, local_c = acc_index(r, c)
            total = c_frag[w * WARP + lane_c, (a_ * ctw + b_) * 2 + local_c]
            for k4 in range(MMA_KW):
                la, _ = operand_index(r, k4)
                lb, _ = operand_index(c, k4)
                total = total + tirx.popcount(tirx.bitwise_and(a_frag[w * WARP + la, a_],
                                                               b_frag[w * WARP + lb, b_]))
            T.buffer_store(c_frag, total, [w * WARP + lane_c, (a_ * ctw + b_) * 2 + local_c])


def build_module(p: CudaProblem, s: CudaSchedule, epilogue: bool = True, emulate: bool = False):
    func = build_func(p, s, epilogue, emulate)
    return tvm.IRModule({func.attrs["global_symbol"] if func.attrs and "global_symbol" in func.attrs
                         else ("main" if epilogue else "acc"): func})
