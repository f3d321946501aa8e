"""Picking and calling the CUDA kernels for tensors on a CUDA device.

`kernel_for(shape, m, device)` is the one entry point the runtime needs: for a CPU device
it returns the CPU kernel (``abqc.codegen.tuning.kernel_for``), for a CUDA device the b1
tensor-core kernel for the device's architecture, with the schedule from the shared tuning
log (keys ``cuda-sm80|m..|n..|k..|w..|a..|g0``) or the search space's default. Token
counts 1..8 use the decode kernel compiled for exactly that M; more tokens the GEMM kernel
(M padded to its tile) under the CPU buckets' keys.
"""
from __future__ import annotations

import functools
import time

import torch
import tvm

from ..compute import KernelShape
from ..tuning import TuningLog, m_bucket
from .compile import cuda_source
from .kernel import (FORMULATION, CudaKernel, CudaWeight, activation_words, device_arch,  # noqa: F401
                     measure_schedules, pack_words, quantize_activations, time_cuda, tuning_record)
from .space import DECODE_MAX_M, CudaProblem, CudaSchedule, candidates, default



def problem_for(shape: KernelShape, m: int, out_dtype: str = "float32") -> CudaProblem:
    if shape.abits == 16:
        raise ValueError("abits=16 (weight-only) has no b1 tensor-core kernel; allowed abits 1..8")
    if shape.group_size:
        raise ValueError(f"group_size={shape.group_size}: the CUDA kernels are per-channel only "
                         "(group_size=0)")
    return CudaProblem(shape.n, shape.k, shape.wbits, shape.abits,
                       decode_m=m if m <= DECODE_MAX_M else 0, out_dtype=out_dtype)


def cuda_tuning_key(shape: KernelShape, m: int, arch: str) -> str:
    mk = m if m <= DECODE_MAX_M else m_bucket(m)
    return (f"cuda-{arch.replace('_', '')}|m{mk}|n{shape.n}|k{shape.k}|w{shape.wbits}"
            f"|a{shape.abits}|g{shape.group_size}")


def kernel_sources(problem: CudaProblem, sched: CudaSchedule, arch: str,
                   functions=("main",)) -> dict[str, str]:
    """CUDA source of each of `functions` ("main": with the epilogue, "acc": raw int32)."""
    return {name: cuda_source(problem, sched, arch, epilogue=name == "main") for name in functions}


def build_kernel(shape: KernelShape, m: int, sched: CudaSchedule, arch: str, out_dtype: str = "float32",
                 functions=("main",), device=None) -> CudaKernel:
    """TVM writes the source, nvcc compiles it, the driver API launches it (`launch`)."""
    problem = problem_for(shape, m, out_dtype)
    return CudaKernel(problem, sched, arch, kernel_sources(problem, sched, arch, functions), device)


@functools.lru_cache(maxsize=256)
def _cached(shape, m, sched, arch, out_dtype):
    return build_kernel(shape, m, sched, arch, out_dtype)


def kernel_for(shape: KernelShape, m: int, device="cpu", tuning_log: TuningLog | None = None,
               out_dtype: str = "float32", **cpu_kwargs):
    """The kernel for a linear of `shape` at M tokens on `device`: CPU kernels for a CPU
    device (unchanged behaviour), the b1 tensor-core kernel for a CUDA device."""
    device = torch.device(device)
    if device.type == "cpu":
        from ..tuning import kernel_for as cpu_kernel_for

        return cpu_kernel_for(shape, m, tuning_log, **cpu_kwargs)
    if device.type != "cuda":
        raise ValueError(f"device={device}: kernels exist for 'cpu' and 'cuda' only")
    arch = device_arch(device)
    problem = problem_for(shape, m, out_dtype)
    rec = (tuning_log or TuningLog()).get(cuda_tuning_key(shape, m, arch))
    sched = CudaSchedule(**rec["params"]) if rec else default(problem, arch, m_bucket(m))
    return _cached(shape, m if m <= DECODE_MAX_M else m_bucket(m), sched, arch, out_dtype)


def tune(shape: KernelShape, m: int, device="cuda", tuning_log: TuningLog | None = None,
         limit: int = 24, out_dtype: str = "float32") -> dict:
    """Measure the search space on the GPU (CUDA events, median of repeats) and log the best
    under the CUDA key; a key already in the log returns at once."""
    tuning_log = tuning_log or TuningLog()
    arch = device_arch(device)
    key = cuda_tuning_key(shape, m, arch)
    if (known := tuning_log.get(key)) is not None:
        return known
    problem = problem_for(shape, m, out_dtype)
    mb = m if m <= DECODE_MAX_M else m_bucket(m)
    t0 = time.perf_counter()
    tried = measure_schedules(lambda p, s: build_kernel(shape, mb, s, arch, out_dtype, device=device),
                              problem, candidates(problem, arch, limit, mb), mb, torch.device(device))
    record = tuning_record(key, shape, mb, tried, time.perf_counter() - t0, arch,
                           torch.cuda.get_device_name(torch.device(device)), tvm.__version__)
    tuning_log.add(record)
    return record


__all__ = ["CudaKernel", "CudaWeight", "activation_words", "build_kernel", "cuda_tuning_key",
           "device_arch", "kernel_for", "kernel_sources", "pack_words", "problem_for", "tune", "time_cuda"]
