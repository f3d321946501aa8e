"""Compile-level report of the CUDA kernels (no GPU needed): for every WxAy, the GEMM and a
decode kernel with the search space's default schedule, compiled by nvcc + ptxas per arch.

    python bench/cuda_compile.py        # -> bench/results/cuda_compile.json

Records registers, shared memory, spills and MMA instructions per kernel, and the build times.
"""
from __future__ import annotations

import datetime
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from abqc.atomic import write_json  # noqa: E402
from abqc.codegen.cuda import space as S  # noqa: E402
from abqc.codegen.cuda.compile import MMA_PTX, compile_many, cuda_source, nvcc_path, ptx_functions  # noqa: E402
from machine import machine_info  # noqa: E402


def main() -> None:
    if nvcc_path() is None:
        raise SystemExit("bench/cuda_compile.py needs nvcc (PATH or /usr/local/cuda/bin)")
    rows, timing = [], {}
    for arch in ("sm_80", "sm_90"):
        t0 = time.perf_counter()
        named, meta = {}, {}
        for wbits, abits in itertools.product(range(1, 9), range(1, 9)):
            for tag, dm in (("g", 0), ("d", 1)):
                p = S.CudaProblem(4096, 4096, wbits, abits, decode_m=dm, out_dtype="float16")
                s = S.default(p, arch)
                named[f"w{wbits}a{abits}{tag}"] = cuda_source(p, s, arch)
                meta[f"w{wbits}a{abits}{tag}_kernel"] = (p, s)
        t_tvm = time.perf_counter() - t0
        res = compile_many(named, arch)
        ptx = ptx_functions(res.ptx)
        timing[arch] = {"tvm_seconds": round(t_tvm, 2), "nvcc_ptxas_seconds": round(res.seconds, 2)}
        for name, (p, s) in meta.items():
            r = res.resources[name]
            rows.append({"arch": arch, "wbits": p.wbits, "abits": p.abits,
                         "kernel": "decode M=1" if p.decode_m else "gemm", "schedule": s.as_dict(),
                         "threads": s.threads, "registers": r.registers, "smem_bytes": r.smem,
                         "smem_estimate": S.smem_bytes(p, s), "spill_bytes": r.spill_stores + r.spill_loads,
                         "mma_in_ptx": ptx[name].count(MMA_PTX)})
        regs = [r["registers"] for r in rows if r["arch"] == arch]
        smem = [r["smem_bytes"] for r in rows if r["arch"] == arch]
        print(f"{arch}: {len(regs)} kernels, registers {min(regs)}..{max(regs)}, smem {min(smem)}..{max(smem)} B, "
              f"TVM {t_tvm:.1f}s, nvcc+ptxas {res.seconds:.1f}s")
    out = os.path.join(os.path.dirname(__file__), "results", "cuda_compile.json")
    write_json(out, {"benchmark": "cuda_compile", "command": "python bench/cuda_compile.py",
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "machine": machine_info(), "timing": timing, "kernels": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
