"""b1 tensor-core kernels on a GPU: exactness for every WxAy, tuning, timings vs torch.

    python bench/cuda_kernels.py                                 # GPU machine with abqc + TVM
    python bench/cuda_kernels.py prepare --out .cuda_bundle --arch sm_90   # any machine with TVM
    python bench/cuda_kernels.py --bundle .cuda_bundle           # GPU machine without TVM

1. bit-exact integer accumulators against ``xq @ wq.T`` for all 64 (wbits, abits): decode
   kernels (M = 1, 5, 8) and the GEMM kernel (M = 37), awkward N and K; the float output
   against the float64 dequantized product; the fused activation quantize+pack kernel
   (`actpack`) against the CPU fake-quant grid packed on the CPU (asymmetric and symmetric);
2. tuning: every candidate schedule of the search space for the shapes x token counts x
   bits asked, timed by CUDA-graph replay (GPU time alone); the best goes to a tuning log
   (``bench/results/cuda_tuning_<gpu>.jsonl``, keys ``cuda-smXY|m..|n..|k..|w..|a..|g0``, the
   runtime's format: ``abqc tune --show --log FILE`` prints it);
3. timings of the tuned kernel (GPU time by graph replay; launched from Python; and with the
   torch-side activation quantization + packing) against torch fp16 ``x @ w.T`` and
   ``torch._int_mm`` (int8) timed the same way, in the same process; "hot" with one weight
   copy (L2-resident on a 50 MB L2), "cold" cycling through copies that exceed the L2.

Where TVM is not installed (the device machines here: its 100 MB wheel cannot travel), the
``prepare`` step writes every kernel's CUDA source on a machine that has it; the GPU run
compiles the bundle with nvcc (in parallel) and launches through the driver API, the same
path `abqc.codegen.cuda.runtime` takes. Refuses to run without CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import re
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K), those of bench/kernels.py
MS = (1, 8, 128)
BITS = ("w1a1", "w2a2", "w2a8", "w3a8", "w4a4", "w4a8", "w8a8")
EXACT_N, EXACT_K, EXACT_MS = 200, 1000, (1, 5, 8, 37)


def _torch_only_imports() -> None:
    """`abqc/__init__` imports TVM; the launch path does not. Without TVM, register the
    packages down to `abqc.codegen.cuda` as bare packages so their torch-only modules import."""
    try:
        import tvm  # noqa: F401
        return
    except ImportError:
        pass
    for name in ("abqc", "abqc.codegen", "abqc.codegen.cuda"):
        mod = types.ModuleType(name)
        mod.__path__ = [str(ROOT.joinpath(*name.split(".")))]
        sys.modules[name] = mod


def _parse_bits(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"w([1-8])a([1-8])", item.strip().lower())
        if not m:
            raise SystemExit(f"--bits item {item!r} is not of the form wXaY with X, Y in 1..8")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _key(problem, sched, fn: str) -> str:
    from dataclasses import asdict

    return json.dumps([asdict(problem), sched.as_dict(), fn], sort_keys=True)


def plan(arch: str, bits, shapes, ms, limit: int) -> dict:
    """Every (problem, schedule, function) the run needs: exactness cases and tuning candidates."""
    from abqc.codegen.cuda.space import DECODE_MAX_M, CudaProblem, candidates, default

    exact, tuning = [], []
    for wbits, abits in itertools.product(range(1, 9), range(1, 9)):
        for m in EXACT_MS:
            p = CudaProblem(EXACT_N, EXACT_K, wbits, abits, decode_m=m if m <= DECODE_MAX_M else 0)
            exact.append((p, default(p, arch, m), ("acc", "main") if m > DECODE_MAX_M else ("acc",), m))
    for (n, k), m, (wbits, abits) in itertools.product(shapes, ms, bits):
        p = CudaProblem(n, k, wbits, abits, decode_m=m if m <= DECODE_MAX_M else 0)
        tuning.append((p, candidates(p, arch, limit, m), m))
    return {"exact": exact, "tuning": tuning}


def prepare(args) -> None:
    """Write the CUDA source of every kernel the GPU run needs, merged into translation units."""
    import tvm

    from abqc.codegen.compute import KernelShape
    from abqc.codegen.cuda.compile import cuda_source, merge_sources
    from abqc.codegen.cuda.runtime import cuda_tuning_key

    pl = plan(args.arch, _parse_bits(args.bits), _shapes(args.shapes), _ms(args.ms), args.limit)
    jobs = [(p, s, fn) for p, s, fns, _ in pl["exact"] for fn in fns]
    jobs += [(p, s, "main") for p, scheds, _ in pl["tuning"] for s in scheds]
    jobs = list({_key(*j): j for j in jobs}.values())
    out = Path(args.out)
    (out / "units").mkdir(parents=True, exist_ok=True)
    index, t0 = {}, time.perf_counter()
    for c in range(0, len(jobs), args.unit_size):
        named = {f"k{c + i}": cuda_source(p, s, args.arch, epilogue=fn == "main")
                 for i, (p, s, fn) in enumerate(jobs[c:c + args.unit_size])}
        for u, (src, names) in enumerate(merge_sources(named)):
            fname = f"unit{c // args.unit_size:04d}_{u}.cu"
            (out / "units" / fname).write_text(src)
            for name in names:
                p, s, fn = jobs[int(name[1:])]
                index[_key(p, s, fn)] = [fname, f"{name}_kernel"]
        print(f"prepare: {min(c + args.unit_size, len(jobs))}/{len(jobs)} kernels "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    keys = {}
    for p, _, m in pl["tuning"]:
        keys[json.dumps([p.n, p.k, p.wbits, p.abits, m])] = cuda_tuning_key(
            KernelShape(p.n, p.k, p.wbits, p.abits), m, args.arch)
    meta = {"arch": args.arch, "tvm": tvm.__version__, "bits": args.bits, "shapes": args.shapes,
            "ms": args.ms, "limit": args.limit, "tuning_keys": keys, "index": index}
    (out / "index.json").write_text(json.dumps(meta))
    print(f"wrote {len(index)} kernels in {len(list((out / 'units').iterdir()))} units to {out}")


class BundleSources:
    """Kernels from a prepared bundle: compiled up front with nvcc, in parallel."""

    def __init__(self, path: str, arch: str, workers: int = 16):
        from abqc.codegen.cuda import launch

        self.dir = Path(path)
        self.meta = json.loads((self.dir / "index.json").read_text())
        if self.meta["arch"] != arch:
            raise SystemExit(f"bundle {path} was prepared for {self.meta['arch']}, this GPU is {arch}")
        self.arch, self.units = arch, {}
        files = sorted({f for f, _ in self.meta["index"].values()})
        t0 = time.perf_counter()
        for f in files:
            self.units[f] = (self.dir / "units" / f).read_text()
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(lambda f: launch.compile_cubin(self.units[f], arch), files))
        print(f"compiled {len(files)} units with nvcc in {time.perf_counter() - t0:.0f} s", flush=True)

    def kernel(self, problem, sched, functions, device):
        from abqc.codegen.cuda.kernel import CudaKernel

        srcs = {}
        for fn in functions:
            fname, entry = self.meta["index"][_key(problem, sched, fn)]
            srcs[fn] = (self.units[fname], entry)
        return CudaKernel(problem, sched, self.arch, srcs, device)

    def tuning_key(self, p, m) -> str:
        return self.meta["tuning_keys"][json.dumps([p.n, p.k, p.wbits, p.abits, m])]


class TvmSources:
    """Kernels whose source TVM writes now (`abqc.codegen.cuda.runtime`)."""

    def __init__(self, arch: str):
        import tvm

        self.arch, self.meta = arch, {"tvm": tvm.__version__}

    def kernel(self, problem, sched, functions, device):
        from abqc.codegen.cuda.kernel import CudaKernel
        from abqc.codegen.cuda.runtime import kernel_sources

        return CudaKernel(problem, sched, self.arch, kernel_sources(problem, sched, self.arch, functions), device)

    def tuning_key(self, p, m) -> str:
        from abqc.codegen.compute import KernelShape
        from abqc.codegen.cuda.runtime import cuda_tuning_key

        return cuda_tuning_key(KernelShape(p.n, p.k, p.wbits, p.abits), m, self.arch)


def _dequant_reference(x, wq, sw, zw, abits) -> torch.Tensor:
    """float64 ((xq - zx) sx) @ ((wq - zw) sw)^T, the product the kernel's epilogue computes."""
    from abqc.codegen.cuda.kernel import quantize_activations

    xq, sx, zx = quantize_activations(x, abits)
    xd = (xq.double() - zx.double()[:, None]) * sx.double()[:, None]
    wd = (wq.double() - zw.double().view(-1, 1)) * sw.double().view(-1, 1)
    return xd @ wd.T


def _copies(t: torch.Tensor, l2: int) -> int:
    """How many copies of `t` together hold twice the L2 (at least 2)."""
    return max(2, -(-2 * l2 // (t.numel() * t.element_size())))


def _actpack_exact(kern, p, m, g, device) -> bool:
    """The fused quantize+pack kernel's words, scales, zeros and code sums equal the CPU
    fake-quant grid packed on the CPU, for the asymmetric and the symmetric grid."""
    from abqc.codegen.cuda.kernel import activation_words, quantize_activations

    ok = True
    for sym in (False, True):
        x = torch.randn(m, p.k, generator=g)
        x[:, 3] *= 20
        acts = kern.prepare(x.to(device), sym)
        xq, sx, zx = quantize_activations(x, p.abits, sym)
        ok &= bool(torch.equal(acts["X"].cpu(), activation_words(p, kern.sched, xq)))
        ok &= bool(torch.equal(acts["sx"][:m].cpu(), sx) and torch.equal(acts["zx"][:m].cpu(), zx))
        ok &= bool(torch.equal(acts["sumx"][:m].cpu(), xq.to(torch.int32).sum(1)))
    return ok


def exactness(src, pl, device) -> list[dict]:
    from abqc.quantizer import compute_qparams, quantize

    rows, g = {}, torch.Generator().manual_seed(0)
    for p, sched, fns, m in pl["exact"]:
        kern = src.kernel(p, sched, fns, device)
        wq = torch.randint(0, 1 << p.wbits, (p.n, p.k), generator=g).to(torch.uint8)
        xq = torch.randint(0, 1 << p.abits, (m, p.k), generator=g).to(torch.uint8)
        w = kern.pack_weight(wq.to(device), torch.ones(p.n), torch.zeros(p.n))
        acc = kern.accumulate(xq.to(device), w).cpu()
        row = rows.setdefault((p.wbits, p.abits), {"wbits": p.wbits, "abits": p.abits, "int_exact": True,
                                                   "cases": 0})
        row["int_exact"] &= bool(torch.equal(acc, (xq.long() @ wq.long().T).to(torch.int32)))
        row["cases"] += 1
        row["actpack_exact"] = row.get("actpack_exact", True) & _actpack_exact(kern, p, m, g, device)
        if "main" in fns:
            wf, x = torch.randn(p.n, p.k, generator=g), torch.randn(m, p.k, generator=g)
            x[:, 3] *= 20  # an outlier channel
            sw, zw = compute_qparams(wf, (1 << p.wbits) - 1, False)
            codes = quantize(wf, sw, zw, (1 << p.wbits) - 1).to(torch.uint8)
            y = kern(x.to(device), kern.pack_weight(codes.to(device), sw, zw)).cpu().double()
            ref = _dequant_reference(x.to(device), codes.to(device), sw.to(device), zw.to(device),
                                     p.abits).cpu()  # same activation codes as the kernel's
            row["float_rel_err"] = float((y - ref).abs().max() / ref.abs().max())
    for r in rows.values():
        print(f"w{r['wbits']}a{r['abits']}: integer {'exact' if r['int_exact'] else 'MISMATCH'}, "
              f"fused activation packing {'exact' if r['actpack_exact'] else 'MISMATCH'} "
              f"({r['cases']} kernels), float rel.err {r.get('float_rel_err', float('nan')):.2e}")
    return list(rows.values())


def timings(src, pl, device, log_path, gpu) -> list[dict]:
    from abqc.codegen.cuda.kernel import measure_schedules, time_cuda, tuning_record
    from abqc.codegen.tuning_log import TuningLog

    tlog, rows = TuningLog(log_path), []
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    g = torch.Generator().manual_seed(1)
    for p, scheds, m in pl["tuning"]:
        key = src.tuning_key(p, m)
        t0 = time.perf_counter()
        tried = measure_schedules(lambda pp, s: src.kernel(pp, s, ("main",), device), p, scheds, m, device)
        rec = tuning_record(key, p, m, tried, time.perf_counter() - t0, src.arch, gpu, src.meta.get("tvm"))
        rec["shape"] = {"n": p.n, "k": p.k, "wbits": p.wbits, "abits": p.abits, "group_size": 0}
        tlog.add(rec)
        from abqc.codegen.cuda.space import CudaSchedule

        kern = src.kernel(p, CudaSchedule(**rec["params"]), ("main",), device)
        x = torch.randn(m, p.k, generator=g).to(device)
        codes = torch.randint(0, 1 << p.wbits, (p.n, p.k), generator=g).to(torch.uint8).to(device)
        w = kern.pack_weight(codes, torch.rand(p.n) + 0.5, torch.zeros(p.n))
        acts = kern.prepare(x)
        y = torch.empty(kern.rows(m), kern.np_, dtype=torch.float32, device=device)
        t_kernel = time_cuda(lambda: kern.run(acts, w, y), repeat=50)
        t_e2e = time_cuda(lambda: kern(x, w), repeat=50, graph=False)  # what a Python caller waits
        t_launch = time_cuda(lambda: kern.run(acts, w, y), repeat=50, graph=False)
        t_fused = time_cuda(lambda: kern.run(kern.prepare(x), w, y), repeat=50)  # GPU: actpack + GEMV
        xh, wh = x.half(), torch.randn(p.n, p.k, device=device, dtype=torch.float16)
        t_fp16 = time_cuda(lambda: xh @ wh.T, repeat=50)
        mi = max(m, 17)  # torch._int_mm needs more than 16 rows
        xi = torch.randint(-128, 127, (mi, p.k), device=device, dtype=torch.int8)
        wi = torch.randint(-128, 127, (p.k, p.n), device=device, dtype=torch.int8)
        try:
            t_int8 = time_cuda(lambda: torch._int_mm(xi, wi), repeat=50)
        except RuntimeError:  # shape constraints (K, N multiples of 8)
            t_int8 = None
        # cold: each call reads another copy of the weights, the copies together 2x the L2,
        # so weights stream from HBM as in a model's decode step (hot: one copy, L2-resident)
        ws = [dataclasses.replace(w, words=w.words.clone()) for _ in range(_copies(w.words, l2))]
        cold = {"kernel": time_cuda([lambda w=w_: kern.run(acts, w, y) for w_ in ws])}
        del ws
        whs = [wh.clone() for _ in range(_copies(wh, l2))]
        cold["fp16"] = time_cuda([lambda w=w_: xh @ w.T for w_ in whs])
        del whs
        if t_int8 is not None:
            wis = [wi.clone() for _ in range(_copies(wi, l2))]
            cold["int8"] = time_cuda([lambda w=w_: torch._int_mm(xi, w) for w_ in wis])
            del wis
        row = {"n": p.n, "k": p.k, "m": m, "wbits": p.wbits, "abits": p.abits, "schedule": rec["params"],
               "candidates": len(scheds), "kernel_ms": t_kernel, "kernel_with_launch_ms": t_launch,
               "actpack_plus_kernel_ms": t_fused, "with_quant_pack_ms": t_e2e,
               "torch_fp16_ms": t_fp16, "torch_int_mm_ms": t_int8, "int_mm_rows": mi,
               "speedup_vs_fp16": t_fp16 / t_kernel,
               "speedup_vs_int8": (t_int8 / t_kernel) if t_int8 else None,
               "cold_kernel_ms": cold["kernel"], "cold_torch_fp16_ms": cold["fp16"],
               "cold_torch_int_mm_ms": cold.get("int8"),
               "cold_speedup_vs_fp16": cold["fp16"] / cold["kernel"],
               "cold_speedup_vs_int8": cold["int8"] / cold["kernel"] if "int8" in cold else None}
        rows.append(row)
        print(f"{p.n}x{p.k} M={m} w{p.wbits}a{p.abits}: {t_kernel:.4f} ms (+actpack {t_fused:.4f}, "
              f"launched from Python {t_launch:.4f}, "
              f"with quant+pack {t_e2e:.4f}); "
              f"fp16 {t_fp16:.4f} ({row['speedup_vs_fp16']:.2f}x); int8 "
              f"{'n/a' if t_int8 is None else f'{t_int8:.4f} ({t_int8 / t_kernel:.2f}x)'} | cold: "
              f"{cold['kernel']:.4f} vs fp16 {cold['fp16']:.4f} ({row['cold_speedup_vs_fp16']:.2f}x), "
              f"int8 {cold.get('int8', float('nan')):.4f} ({row['cold_speedup_vs_int8'] or float('nan'):.2f}x)",
              flush=True)
    return rows


def _shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def _ms(text):
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", choices=("run", "prepare"), default="run")
    ap.add_argument("--bits", default=",".join(BITS), help="comma list of wXaY to time and tune")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK list")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts")
    ap.add_argument("--limit", type=int, default=12, help="candidate schedules per problem")
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument("--bundle", help="run: kernel sources prepared elsewhere (no TVM needed)")
    ap.add_argument("--out", default=".cuda_bundle", help="prepare: the bundle directory")
    ap.add_argument("--arch", default="sm_90", help="prepare: the GPU architecture (sm_80, sm_90)")
    ap.add_argument("--unit-size", type=int, default=48, help="prepare: kernels per nvcc unit")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="run: output directory")
    args = ap.parse_args()
    if args.mode == "prepare":
        return prepare(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench/cuda_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
                         "here (the compile-level checks are tests/test_cuda_codegen.py)")
    _torch_only_imports()
    from abqc.atomic import write_json
    from abqc.codegen.cuda.kernel import device_arch
    from machine import machine_info

    device = torch.device("cuda")
    name, arch = torch.cuda.get_device_name(device), device_arch(device)
    src = BundleSources(args.bundle, arch) if args.bundle else TvmSources(arch)
    if args.bundle:  # what was prepared is what runs
        args.bits, args.shapes, args.ms, args.limit = (src.meta[k] for k in ("bits", "shapes", "ms", "limit"))
    pl = plan(arch, _parse_bits(args.bits), _shapes(args.shapes), _ms(args.ms), args.limit)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "cuda_kernels", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "gpu": name, "arch": arch, "torch": torch.__version__,
              "kernel_source": "bundle (TVM " + str(src.meta.get("tvm")) + ")" if args.bundle else "TVM",
              "exactness": [] if args.skip_exactness else exactness(src, pl, device)}
    result["timings"] = timings(src, pl, device, out_dir / f"cuda_tuning_{slug}.jsonl", name)
    out = write_json(out_dir / f"cuda_kernels_{slug}.json", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
