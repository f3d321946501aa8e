"""Picking and calling the CUDA kernels for tensors on a CUDA device.

`kernel_for(shape, m, device)` is the one entry point the runtime needs: for a CPU device
it returns the CPU kernel (``abqc.codegen.tuning.kernel_for``), for a CUDA device the b1
tensor-core kernel for the device's architecture, with the schedule from the shared tuning
log (keys ``cuda-sm80|m..|n..|k..|w..|a..|g0``) or the search space's default. Token
counts 1..8 use the decode kernel compiled for exactly that M; more tokens the GEMM kernel
(M padded to its tile) under the CPU buckets' keys.
"""
from __future__ import annotations

import datetime
import functools
import json
import time
from dataclasses import dataclass

import torch
import tvm

from ..compute import KernelShape
from ..kernel import quantize_activations
from ..tuning import TuningLog, m_bucket
from .space import DECODE_MAX_M, CudaProblem, CudaSchedule, candidates, default, kw_words, n_padded

FORMULATION = "b1mma"


def device_arch(device) -> str:
    """``sm_XY`` of a CUDA device (raises ValueError for anything else)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device={device} is not a CUDA device")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


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


def pack_words(codes: torch.Tensor, bits: int, rows: int, kw: int) -> torch.Tensor:
    """Codes [R, K] -> int32 bit-plane words [bits, rows, kw] on the codes' device, zero-padded
    (rows >= R, kw*32 >= K). Same bit order as `packing.pack_bitplanes` viewed as int32."""
    r, k = codes.shape
    dev = codes.device
    c = torch.zeros(rows, kw * 32, dtype=torch.uint8, device=dev)
    c[:r, :k] = codes.to(torch.uint8)
    planes = (c.unsqueeze(0) >> torch.arange(bits, dtype=torch.uint8, device=dev).view(-1, 1, 1)) & 1
    weights = (1 << torch.arange(8, dtype=torch.int32, device=dev))
    by = (planes.view(bits, rows, kw * 4, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return by.contiguous().view(torch.int32).view(bits, rows, kw)


@dataclass
class CudaWeight:
    problem_n: int
    words: torch.Tensor  # int32 [wbits, Np, KW]
    scale: torch.Tensor  # float32 [Np]
    zero: torch.Tensor  # float32 [Np]
    sumw: torch.Tensor  # int32 [Np]
    kg: torch.Tensor  # float32 [1]


class CudaKernel:
    """A compiled b1-MMA kernel for one (shape, M, schedule, arch)."""

    def __init__(self, shape: KernelShape, m: int, sched: CudaSchedule, arch: str,
                 out_dtype: str = "float32", functions=("main",)):
        from .compile import build

        self.shape, self.m, self.sched, self.arch = shape, m, sched, arch
        self.problem = problem_for(shape, m, out_dtype)
        self.ex = build(self.problem, sched, arch, functions)
        self.kw, self.np_ = kw_words(self.problem, sched), n_padded(self.problem, sched)

    def pack_weight(self, codes, scale, zero) -> CudaWeight:
        s, dev = self.shape, codes.device
        if codes.shape != (s.n, s.k):
            raise ValueError(f"codes {tuple(codes.shape)} do not match N={s.n}, K={s.k}")
        pad = self.np_ - s.n

        def vec(t, dtype):
            t = t.reshape(-1).to(device=dev, dtype=dtype)
            return torch.nn.functional.pad(t, (0, pad)).contiguous()
        return CudaWeight(s.n, pack_words(codes, s.wbits, self.np_, self.kw), vec(scale, torch.float32),
                          vec(zero, torch.float32), vec(codes.to(torch.int32).sum(1), torch.int32),
                          torch.tensor([float(s.k)], device=dev))

    def activation_words(self, xq: torch.Tensor) -> torch.Tensor:
        return activation_words(self.problem, self.sched, xq)

    def _rows(self, m: int) -> int:
        return m if self.problem.decode_m else -(-m // self.sched.bm) * self.sched.bm

    def accumulate(self, xq: torch.Tensor, w: CudaWeight) -> torch.Tensor:
        """Raw int32 Σ_k xq wq [M, N] (built with functions=("acc",))."""
        m = xq.shape[0]
        acc = torch.empty(self._rows(m), self.np_, dtype=torch.int32, device=xq.device)
        self.ex["acc"](*_dl(self.activation_words(xq), w.words, acc))
        return acc[:m, :w.problem_n]

    def __call__(self, x: torch.Tensor, w: CudaWeight, act_symmetric: bool = False) -> torch.Tensor:
        x = x.reshape(-1, self.shape.k)
        m = x.shape[0]
        xq, sx, zx = quantize_activations(x, self.shape.abits, act_symmetric)
        rows = self._rows(m)

        def pad(t, dtype):
            return torch.nn.functional.pad(t.reshape(-1).to(dtype), (0, rows - m)).contiguous()
        y = torch.empty(rows, self.np_, dtype=getattr(torch, self.problem.out_dtype), device=x.device)
        self.ex["main"](*_dl(self.activation_words(xq), w.words, pad(sx, torch.float32),
                             pad(zx, torch.float32), pad(xq.to(torch.int32).sum(1), torch.int32),
                             w.scale, w.zero, w.sumw, w.kg, y))
        return y[:m, :w.problem_n]


def activation_words(p: CudaProblem, s: CudaSchedule, xq: torch.Tensor) -> torch.Tensor:
    """Activation codes [M, K] -> the kernel's X argument (GEMM: [abits, M padded to bm, KW];
    decode: [1, rows, KW] with row i*M+m = plane i of token m, zero rows up to whole 8s)."""
    m, kw = xq.shape[0], kw_words(p, s)
    if p.decode_m:
        if m != p.decode_m:
            raise ValueError(f"decode kernel for M={p.decode_m} called with M={m}")
        planes = pack_words(xq, p.abits, m, kw).reshape(p.abits * m, kw)
        out = torch.zeros(1, p.decode_rows, kw, dtype=torch.int32, device=xq.device)
        out[0, :p.abits * m] = planes
        return out
    return pack_words(xq, p.abits, -(-m // s.bm) * s.bm, kw)


def _dl(*tensors):
    return [tvm.runtime.from_dlpack(t.contiguous()) for t in tensors]


@functools.lru_cache(maxsize=256)
def _cached(shape, m, sched, arch, out_dtype):
    return CudaKernel(shape, m, sched, arch, out_dtype)


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
    g = torch.Generator(device="cpu").manual_seed(0)
    codes = torch.randint(0, 1 << shape.wbits, (shape.n, shape.k), generator=g).to(device)
    x = torch.randn(mb, shape.k, generator=g).to(device)
    tried, t0 = [], time.perf_counter()
    for sched in candidates(problem, arch, limit, mb):
        kern = CudaKernel(shape, mb, sched, arch, out_dtype)
        w = kern.pack_weight(codes, torch.ones(shape.n), torch.zeros(shape.n))
        ms = time_cuda(lambda: kern(x, w))
        tried.append({"formulation": FORMULATION, "params": sched.as_dict(), "ms": round(ms, 5)})
    best = min(tried, key=lambda r: r["ms"])
    record = {"key": key, "formulation": FORMULATION, "params": best["params"], "ms": best["ms"],
              "m": mb, "shape": {"n": shape.n, "k": shape.k, "wbits": shape.wbits,
                                 "abits": shape.abits, "group_size": shape.group_size},
              "candidates": tried, "tuning_seconds": round(time.perf_counter() - t0, 2),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "tvm": tvm.__version__, "target": json.dumps({"kind": "cuda", "arch": arch}),
              "gpu": torch.cuda.get_device_name(torch.device(device))}
    tuning_log.add(record)
    return record


def time_cuda(fn, warmup: int = 3, repeat: int = 20) -> float:
    """Median milliseconds of `fn` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


__all__ = ["CudaKernel", "CudaWeight", "cuda_tuning_key", "device_arch", "kernel_for",
           "pack_words", "tune", "time_cuda"]
