"""A compiled b1-MMA kernel bound to torch tensors: packing, launch geometry, the call.

Torch-only (no TVM import): the CUDA source comes in as text (`runtime` generates it with
TVM; a machine without TVM can use sources generated elsewhere), `launch` compiles and
launches it.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import dataclass

import torch

from ...quantizer import compute_qparams
from . import launch
from .space import CudaProblem, CudaSchedule, kw_words, n_padded

FORMULATION = "b1mma"


def device_arch(device) -> str:
    """``sm_XY`` of a CUDA device (raises ValueError for anything else)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device={device} is not a CUDA device")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def quantize_activations(x: torch.Tensor, bits: int, symmetric: bool = False):
    """Per-token (codes uint8 [M, K], scale [M], zero [M]) on the fake-quant ops' grid."""
    qmax = (1 << bits) - 1
    s, z = compute_qparams(x.float(), qmax, symmetric)
    codes = torch.round(x.float() / s + z).clamp_(0, qmax).to(torch.uint8)
    return codes, s.view(-1).contiguous(), z.view(-1).contiguous()


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


@dataclass
class CudaWeight:
    problem_n: int
    words: torch.Tensor  # int32 [wbits, Np, KW]
    scale: torch.Tensor  # float32 [Np]
    zero: torch.Tensor  # float32 [Np]
    sumw: torch.Tensor  # int32 [Np]
    kg: torch.Tensor  # float32 [1]


class CudaKernel:
    """The kernels ``main`` (with the dequantization epilogue) and/or ``acc`` (raw int32
    accumulators) of one (problem, schedule, arch), from their CUDA sources."""

    def __init__(self, problem: CudaProblem, sched: CudaSchedule, arch: str,
                 sources: dict[str, str | tuple[str, str]], device=None):
        """`sources`: function name ("main"/"acc") -> its CUDA source (entry ``<name>_kernel``)
        or (source, entry) for a kernel inside a merged translation unit."""
        self.problem, self.sched, self.arch = problem, sched, arch
        self.fns = {}
        for name, src in sources.items():
            src, entry = src if isinstance(src, tuple) else (src, f"{name}_kernel")
            self.fns[name] = launch.load(src, arch, entry, device)
        self.kw, self.np_ = kw_words(problem, sched), n_padded(problem, sched)

    @property
    def n(self) -> int:
        return self.problem.n

    @property
    def k(self) -> int:
        return self.problem.k

    def pack_weight(self, codes, scale, zero) -> CudaWeight:
        p, dev = self.problem, codes.device
        if codes.shape != (p.n, p.k):
            raise ValueError(f"codes {tuple(codes.shape)} do not match N={p.n}, K={p.k}")
        pad = self.np_ - p.n

        def vec(t, dtype):
            t = t.reshape(-1).to(device=dev, dtype=dtype)
            return torch.nn.functional.pad(t, (0, pad)).contiguous()
        return CudaWeight(p.n, pack_words(codes, p.wbits, self.np_, self.kw), vec(scale, torch.float32),
                          vec(zero, torch.float32), vec(codes.to(torch.int32).sum(1), torch.int32),
                          torch.tensor([float(p.k)], device=dev))

    def activation_words(self, xq: torch.Tensor) -> torch.Tensor:
        return activation_words(self.problem, self.sched, xq)

    def rows(self, m: int) -> int:
        """Output rows the kernel writes for M tokens (the GEMM pads M to its tile)."""
        return m if self.problem.decode_m else -(-m // self.sched.bm) * self.sched.bm

    def grid(self, m: int) -> tuple[int, int, int]:
        return (self.np_ // self.sched.bn, 1 if self.problem.decode_m else self.rows(m) // self.sched.bm, 1)

    def launch(self, name: str, m: int, **args) -> None:
        """Launch kernel `name` for M tokens with tensors bound by parameter name."""
        self.fns[name](self.grid(m), (self.sched.threads, 1, 1), {"mrows": self.rows(m), **args})

    def accumulate(self, xq: torch.Tensor, w: CudaWeight) -> torch.Tensor:
        """Raw int32 Σ_k xq wq [M, N] (needs the ``acc`` source)."""
        m = xq.shape[0]
        acc = torch.empty(self.rows(m), self.np_, dtype=torch.int32, device=xq.device)
        self.launch("acc", m, X=self.activation_words(xq), W=w.words, acc=acc)
        return acc[:m, :w.problem_n]

    def prepare(self, x: torch.Tensor, act_symmetric: bool = False) -> dict:
        """Per-call activation arguments: quantized, bit-plane packed, padded to the rows.
        On a GPU one fused kernel (`actpack`) writes them into buffers kept per token count
        (``ABQC_CUDA_ACTPACK=0``: the torch ops instead)."""
        x = x.reshape(-1, self.problem.k)
        m = x.shape[0]
        if x.is_cuda and os.environ.get("ABQC_CUDA_ACTPACK", "1") != "0":
            return self._prepare_fused(x, m, act_symmetric)
        xq, sx, zx = quantize_activations(x, self.problem.abits, act_symmetric)
        rows = self.rows(m)

        def pad(t, dtype):
            return torch.nn.functional.pad(t.reshape(-1).to(dtype), (0, rows - m)).contiguous()
        return {"X": self.activation_words(xq), "sx": pad(sx, torch.float32), "zx": pad(zx, torch.float32),
                "sumx": pad(xq.to(torch.int32).sum(1), torch.int32), "m": m}

    def _prepare_fused(self, x: torch.Tensor, m: int, act_symmetric: bool) -> dict:
        from . import actpack

        p, rows = self.problem, self.rows(m)
        bufs = self.__dict__.setdefault("_act_bufs", {}).get((m, x.device))
        if bufs is None:  # zeros: padded rows and words are never written
            shape = (1, p.decode_rows, self.kw) if p.decode_m else (p.abits, rows, self.kw)
            z = functools.partial(torch.zeros, device=x.device)
            bufs = {"X": z(shape, dtype=torch.int32), "sx": z(rows), "zx": z(rows),
                    "sumx": z(rows, dtype=torch.int32), "m": m}
            self._act_bufs[(m, x.device)] = bufs
        plane_stride = (m if p.decode_m else rows) * self.kw
        actpack.quantize_pack(x.float().contiguous(), p.abits, act_symmetric, self.kw, plane_stride,
                              bufs["X"], bufs["sx"], bufs["zx"], bufs["sumx"], self.arch)
        return bufs

    def run(self, acts: dict, w: CudaWeight, y: torch.Tensor | None = None) -> torch.Tensor:
        """The ``main`` kernel on prepared activations; returns y [M, N]."""
        m = acts["m"]
        if y is None:
            y = torch.empty(self.rows(m), self.np_, dtype=getattr(torch, self.problem.out_dtype),
                            device=acts["X"].device)
        self.launch("main", m, X=acts["X"], W=w.words, sx=acts["sx"], zx=acts["zx"], sumx=acts["sumx"],
                    sw=w.scale, zw=w.zero, sumw=w.sumw, kg=w.kg, y=y)
        return y[:m, :w.problem_n]

    def __call__(self, x: torch.Tensor, w: CudaWeight, act_symmetric: bool = False) -> torch.Tensor:
        return self.run(self.prepare(x, act_symmetric), w)


def time_cuda(fn, warmup: int = 3, repeat: int = 20, graph: bool = True) -> float:
    """Median milliseconds of one `fn` on the GPU (a list of callables: called in turn, e.g.
    over copies of the weights that together exceed L2, for cold-cache times). With `graph`, `repeat` calls are captured
    in a CUDA graph and replayed, so the time is the GPU's alone (no Python/launch overhead,
    which is tens of microseconds and would swamp a GEMV); else CUDA events around each call."""
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    repeat = max(repeat, len(fns))

    def call(i):
        fns[i % len(fns)]()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(warmup, len(fns))):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(repeat):
                call(i)
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / repeat)
        return sorted(times)[len(times) // 2]
    times = []
    for i in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call(i)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def measure_schedules(make_kernel, problem: CudaProblem, schedules, m: int, device) -> list[dict]:
    """Time the ``main`` kernel of each schedule (activation packing excluded) on random
    data; `make_kernel(problem, sched)` builds a `CudaKernel`. Schedules that fail to
    compile or launch are recorded with their error, not raised."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << problem.wbits, (problem.n, problem.k), generator=g).to(torch.uint8)
    x = torch.randn(m, problem.k, generator=g)
    tried = []
    for sched in schedules:
        try:
            kern = make_kernel(problem, sched)
            w = kern.pack_weight(codes.to(device), torch.rand(problem.n) + 0.5, torch.zeros(problem.n))
            acts = kern.prepare(x.to(device))
            y = torch.empty(kern.rows(m), kern.np_, dtype=getattr(torch, problem.out_dtype), device=device)
            ms = time_cuda(lambda: kern.run(acts, w, y))
            tried.append({"params": sched.as_dict(), "ms": round(ms, 5)})
        except RuntimeError as e:  # e.g. too many resources requested for launch
            tried.append({"params": sched.as_dict(), "ms": None, "error": str(e).splitlines()[0][:200]})
    return tried


def tuning_record(key: str, shape, m: int, tried: list[dict], seconds: float, arch: str, gpu: str,
                  tvm_version: str | None = None) -> dict:
    """The tuning-log record of a CUDA tuning run (same fields as the CPU tuner's)."""
    ok = [r for r in tried if r["ms"] is not None]
    if not ok:
        raise RuntimeError(f"no schedule of {key} ran: {tried[0].get('error') if tried else 'none tried'}")
    best = min(ok, key=lambda r: r["ms"])
    return {"key": key, "formulation": FORMULATION, "params": best["params"], "ms": best["ms"], "m": m,
            "shape": {"n": shape.n, "k": shape.k, "wbits": shape.wbits, "abits": shape.abits,
                      "group_size": getattr(shape, "group_size", 0)},
            "candidates": [{"formulation": FORMULATION, **r} for r in tried],
            "tuning_seconds": round(seconds, 2),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "tvm": tvm_version, "target": json.dumps({"kind": "cuda", "arch": arch}),
            "gpu": gpu}


__all__ = ["CudaKernel", "CudaWeight", "activation_words", "device_arch", "measure_schedules",
           "pack_words", "quantize_activations", "time_cuda", "tuning_record"]
