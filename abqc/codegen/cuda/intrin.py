"""Tensor intrinsics for the binary tensor-core MMA (``m8n8k128 ... b1.b1.s32.and.popc``).

TVM 0.27 registers MMA intrinsics for f16/i8/f8 only. These four describe the b1 MMA at
the granularity the schedule sees: 32-bit words of packed bit planes (bit t of a word is
one K element), so one MMA is ``C[8, 8] += Σ_{w<4} popcount(A[8, w] AND B[8, w])``.

Fragment layouts (PTX ISA, m8n8k128 b1): lane ``l`` holds A word ``(l/4, l%4)`` and B word
``(n=l/4, l%4)`` (one .b32 each), and C elements ``(l/4, 2(l%4) + {0,1})``. ``ldmatrix``
has no b1 form, so the fragment loads are plain 32-bit shared-memory loads, one per lane.
The fragments live in TVM's ``warp`` scope as ``[32 lanes, local]`` buffers (a schedule
maps the logical 8x4 / 8x8 tiles onto them with ``transform_layout`` using `operand_index`
and `acc_index`).

Status in apache-tvm 0.27.0.post1: registration works, but ``Schedule.tensorize`` crashes
the process (a segfault inside tvm_ffi, reproduced with TVM's own ``mma_fill_16x16_i32``),
so `template` emits the impl bodies below directly and uses `operand_index` / `acc_index`
for its fragment addressing and its CPU emulation. The descs stay the executable
specification of one MMA; once tensorize works they let a scheduled TE compute use them.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

MMA_M = MMA_N = 8
MMA_KW = 4  # 32-bit words per MMA K step (128 bits)
WARP = 32

LOAD_A = "abqc_b1_load_a"
LOAD_B = "abqc_b1_load_b"
MMA = "abqc_b1_mma_m8n8k128_and_popc"
FILL = "abqc_b1_fill_i32"
STORE = "abqc_b1_store_i32_shared"


def operand_index(r, w):
    """(row, word) of an 8x4 A or B word tile -> (lane, local)."""
    return r * MMA_KW + w, 0


def acc_index(r, c):
    """(row, col) of the 8x8 int32 accumulator tile -> (lane, local)."""
    return r * 4 + c // 2, c % 2


@T.prim_func(s_tir=True)
def _load_desc(w_h: T.handle, s_h: T.handle) -> None:
    s = T.match_buffer(s_h, (8, 4), "int32", align=16, offset_factor=1, scope="shared")
    w = T.match_buffer(w_h, (32, 1), "int32", offset_factor=1, scope="warp")
    with T.sblock("root"):
        T.reads(s[0:8, 0:4])
        T.writes(w[0:32, 0:1])
        for r, c in T.grid(8, 4):
            with T.sblock("load"):
                vr, vc = T.axis.remap("SS", [r, c])
                T.reads(s[vr, vc])
                T.writes(w[vr * 4 + vc, 0])
                w[vr * 4 + vc, 0] = s[vr, vc]


@T.prim_func(s_tir=True)
def _load_impl(w_h: T.handle, s_h: T.handle) -> None:
    s0 = T.int32()
    s1 = T.int32()
    s = T.match_buffer(s_h, (8, 4), "int32", align=16, offset_factor=1, scope="shared",
                       strides=[s0, s1])
    w = T.match_buffer(w_h, (32, 1), "int32", offset_factor=1, scope="warp")
    with T.sblock("root"):
        T.reads(s[0:8, 0:4])
        T.writes(w[0:32, 0:1])
        for tx in T.thread_binding(0, 32, "threadIdx.x"):
            w[tx, 0] = s[tx // 4, tx % 4]


@T.prim_func(s_tir=True)
def _mma_desc(a_h: T.handle, b_h: T.handle, c_h: T.handle) -> None:
    a = T.match_buffer(a_h, (32, 1), "int32", offset_factor=1, scope="warp")
    b = T.match_buffer(b_h, (32, 1), "int32", offset_factor=1, scope="warp")
    c = T.match_buffer(c_h, (32, 2), "int32", offset_factor=1, scope="warp")
    with T.sblock("root"):
        T.reads(c[0:32, 0:2], a[0:32, 0:1], b[0:32, 0:1])
        T.writes(c[0:32, 0:2])
        for i, j, k in T.grid(8, 8, 4):
            with T.sblock("mma"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                T.reads(c[vi * 4 + vj // 2, vj % 2], a[vi * 4 + vk, 0], b[vj * 4 + vk, 0])
                T.writes(c[vi * 4 + vj // 2, vj % 2])
                c[vi * 4 + vj // 2, vj % 2] = c[vi * 4 + vj // 2, vj % 2] + T.popcount(
                    T.bitwise_and(a[vi * 4 + vk, 0], b[vj * 4 + vk, 0]))


@T.prim_func(s_tir=True)
def _mma_impl(a_h: T.handle, b_h: T.handle, c_h: T.handle) -> None:
    a = T.match_buffer(a_h, (32, 1), "int32", offset_factor=1, scope="warp")
    b = T.match_buffer(b_h, (32, 1), "int32", offset_factor=1, scope="warp")
    c = T.match_buffer(c_h, (32, 2), "int32", offset_factor=1, scope="warp")
    with T.sblock("root"):
        T.reads(c[0:32, 0:2], a[0:32, 0:1], b[0:32, 0:1])
        T.writes(c[0:32, 0:2])
        for tx in T.thread_binding(0, 32, "threadIdx.x"):
            T.evaluate(T.ptx_legacy.mma(
                "m8n8k128", "row", "col", "int1", "int1", "int32",
                a.data, a.elem_offset + tx, b.data, b.elem_offset + tx,
                c.data, c.elem_offset + tx * 2, False, "and", dtype="int32"))


@T.prim_func(s_tir=True)
def _fill_desc(c_h: T.handle) -> None:
    c = T.match_buffer(c_h, (32, 2), "int32", offset_factor=1, scope="warp")
    with T.sblock("root"):
        T.reads()
        T.writes(c[0:32, 0:2])
        for i, j in T.grid(8, 8):
            with T.sblock("fill"):
                vi, vj = T.axis.remap("SS", [i, j])
                T.reads()
                T.writes(c[vi * 4 + vj // 2, vj % 2])
                c[vi * 4 + vj // 2, vj % 2] = 0


@T.prim_func(s_tir=True)
def _fill_impl(c_h: T.handle) -> None:
    c = T.match_buffer(c_h, (32, 2), "int32", offset_factor=1, scope="warp")
    with T.sblock("root"):
        T.reads()
        T.writes(c[0:32, 0:2])
        for tx in T.thread_binding(0, 32, "threadIdx.x"):
            for l in T.serial(2):
                c[tx, l] = 0


@T.prim_func(s_tir=True)
def _store_desc(c_h: T.handle, s_h: T.handle) -> None:
    c = T.match_buffer(c_h, (32, 2), "int32", offset_factor=1, scope="warp")
    s = T.match_buffer(s_h, (8, 8), "int32", offset_factor=1, scope="shared")
    with T.sblock("root"):
        T.reads(c[0:32, 0:2])
        T.writes(s[0:8, 0:8])
        for i, j in T.grid(8, 8):
            with T.sblock("store"):
                vi, vj = T.axis.remap("SS", [i, j])
                T.reads(c[vi * 4 + vj // 2, vj % 2])
                T.writes(s[vi, vj])
                s[vi, vj] = c[vi * 4 + vj // 2, vj % 2]


@T.prim_func(s_tir=True)
def _store_impl(c_h: T.handle, s_h: T.handle) -> None:
    s0 = T.int32()
    s1 = T.int32()
    c = T.match_buffer(c_h, (32, 2), "int32", offset_factor=1, scope="warp")
    s = T.match_buffer(s_h, (8, 8), "int32", offset_factor=1, scope="shared", strides=[s0, s1])
    with T.sblock("root"):
        T.reads(c[0:32, 0:2])
        T.writes(s[0:8, 0:8])
        for tx in T.thread_binding(0, 32, "threadIdx.x"):
            for l in T.serial(2):
                s[tx // 4, (tx % 4) * 2 + l] = c[tx, l]


def register() -> None:
    """Register the intrinsics once per process (TensorIntrin names are global)."""
    for name, desc, impl in ((LOAD_A, _load_desc, _load_impl), (LOAD_B, _load_desc, _load_impl),
                             (MMA, _mma_desc, _mma_impl), (FILL, _fill_desc, _fill_impl),
                             (STORE, _store_desc, _store_impl)):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, desc, impl)


register()
