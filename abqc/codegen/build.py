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
        funcs = {name: vnni(shape, name == "main", p["n_tile"], p["chains"]) for name in functions}
    elif formulation not in COMPUTES:
        raise ValueError(f"formulation={formulation!r} is not one of {sorted(COMPUTES) + ['unpack', 'vnni']}")
    else:
        make = COMPUTES[formulation]
        funcs = {name: schedule(make(shape, name == "main"), params, epilogue=name == "main")
                 for name in functions}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(mod, target=target or host_target())
