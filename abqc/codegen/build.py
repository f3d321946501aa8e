"""Build one kernel (a formulation, a shape, a schedule) with TVM's LLVM backend."""
from __future__ import annotations

import functools
import os
from typing import Any

import tvm

from .compute import COMPUTES, KernelShape
from .schedule import schedule


@functools.lru_cache(maxsize=1)
def host_target() -> tvm.target.Target:
    """LLVM for this CPU (its features, e.g. AVX2 + POPCNT) and its core count."""
    cfg = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    try:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        if cpu and cpu != "generic":
            cfg["mcpu"] = cpu
    except Exception:  # noqa: BLE001 - older builds lack the query: plain llvm still works
        pass
    return tvm.target.Target(cfg)


def build(formulation: str, shape: KernelShape, params: dict[str, Any], target=None,
          functions: tuple[str, ...] = ("main", "acc")):
    """An executable with ``main`` (accumulate + epilogue, float32 out) and/or ``acc`` (the
    integer or float accumulator [M, N, G] only, for exactness tests)."""
    if formulation == "unpack":
        from .unpack import UNPACK_DEFAULT, schedule_unpack, unpack
        mt = {**UNPACK_DEFAULT, **params}["m_tile"]
        funcs = {name: schedule_unpack(unpack(shape, name == "main", mt), params, name == "main")
                 for name in functions}
    elif formulation == "vnni":
        from .vnni import VNNI_DEFAULT, vnni, vnni_supported
        if not vnni_supported():
            raise RuntimeError("the vnni formulation needs a CPU with AVX-512 VNNI (avx512_vnni, "
                               "avx512bw), which this one lacks; re-compile the model here so its "
                               "weights are packed for another formulation")
        p = {**VNNI_DEFAULT, **params}
        if p.get("m_tile", 1) > 1:  # the prefill kernel: a register block of rows x tokens
            from .vnni_gemm import BUILD_CONFIG, vnni_gemm
            funcs = {name: vnni_gemm(shape, name == "main", p["n_tile"], p["m_tile"])
                     for name in functions}
            return _compile(funcs, target, BUILD_CONFIG)
        funcs = {name: vnni(shape, name == "main", p["n_tile"], p["chains"]) for name in functions}
    elif formulation not in COMPUTES:
        raise ValueError(f"formulation={formulation!r} is not one of {sorted(COMPUTES) + ['unpack', 'vnni']}")
    else:
        make = COMPUTES[formulation]
        funcs = {name: schedule(make(shape, name == "main"), params, epilogue=name == "main")
                 for name in functions}
    return _compile(funcs, target)


def _compile(funcs: dict, target, config: dict | None = None):
    """tvm.compile the named PrimFuncs, under the current PassContext plus `config`."""
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    if not config:
        return tvm.compile(mod, target=target or host_target())
    ctx = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=ctx.opt_level, config={**ctx.config, **config},
                                   instruments=list(ctx.instruments)):
        return tvm.compile(mod, target=target or host_target())
