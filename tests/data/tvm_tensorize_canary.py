"""Smallest TensorIR tensorize: a 4-element copy intrinsic on a 16-element copy, for LLVM.

Run as a subprocess by tests/test_cuda_codegen.py: in apache-tvm 0.27.0.post1 it segfaults
inside ``Schedule.tensorize`` (any intrinsic, traced or not), which is why the CUDA kernels
are emitted as TensorIR directly instead of tensorizing a scheduled compute. Prints "ok" and
exits 0 once tensorize works.
"""
import tvm, tvm.s_tir as s_tir
from tvm.script import tirx as T
from tvm.s_tir import TensorIntrin

@T.prim_func(s_tir=True)
def desc(a: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int32", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(A[0:4]); T.writes(C[0:4])
        for i in range(4):
            with T.sblock("cp"):
                vi = T.axis.remap("S", [i])
                C[vi] = A[vi]

@T.prim_func(s_tir=True)
def impl(a: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int32", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(A[0:4]); T.writes(C[0:4])
        for i in range(4):
            C[i] = A[i] + 0

TensorIntrin.register("toy_copy4", desc, impl)

@T.prim_func(s_tir=True)
def f(A: T.Buffer((16,), "int32"), C: T.Buffer((16,), "int32")):
    for i in range(16):
        with T.sblock("cp"):
            vi = T.axis.remap("S", [i])
            C[vi] = A[vi]
sch = s_tir.Schedule(tvm.IRModule({"main": f}))
io, ii = sch.split(sch.get_loops(sch.get_sblock("cp"))[0], [None, 4])
sch.tensorize(ii, "toy_copy4")
import numpy as np  # noqa: E402

ex = tvm.compile(sch.mod, target={"kind": "llvm"})
a = tvm.runtime.tensor(np.arange(16, dtype="int32"), tvm.cpu())
c = tvm.runtime.tensor(np.zeros(16, dtype="int32"), tvm.cpu())
ex["main"](a, c)
assert (c.numpy() == np.arange(16)).all()
print("ok")
