"""CUDA source from TVM, and offline compilation with nvcc/ptxas (no GPU needed).

Many kernels are merged into one translation unit (kernels renamed, TVM's per-kernel
helper functions de-duplicated) so a whole WxAy sweep costs one nvcc front-end run per
architecture; ``ptxas -v`` then reports each kernel's registers, shared memory and
spills, checked against the architecture's limits.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm

from .launch import nvcc_path  # noqa: F401  (re-exported: tests import it from here)
from .space import ARCH_LIMITS, CudaProblem, CudaSchedule
from .template import build_func

MMA_PTX = "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc"


def cuda_target(arch: str = "sm_80") -> tvm.target.Target:
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch={arch!r} is not one of {sorted(ARCH_LIMITS)} (the b1 .and MMA "
                         "needs sm_80 or newer)")
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def build(p: CudaProblem, s: CudaSchedule, arch: str = "sm_80", functions=("main",)):
    """A TVM Executable for the GPU; the runtime uses only its CUDA source (`cuda_source`),
    which `launch` compiles with nvcc and runs on torch's stream."""
    funcs = {name: build_func(p, s, epilogue=name == "main") for name in functions}
    # no host-side CSE: the kernel's scalar parameters stay the PrimFunc's own (``mrows``),
    # which `launch` binds by name
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        return tvm.compile(tvm.IRModule(funcs), target=cuda_target(arch))


def cuda_source(p: CudaProblem, s: CudaSchedule, arch: str = "sm_80", epilogue: bool = True) -> str:
    ex = build(p, s, arch, functions=("main" if epilogue else "acc",))
    return ex.mod.imports[0].inspect_source()


_HELPER = re.compile(r"^__forceinline__ __device__ .*?^}\n", re.S | re.M)
_KERNEL_NAME = re.compile(r"\b(main|acc)_kernel\b")


def _split(src: str) -> tuple[str, list[str], str]:
    """(static preamble, helper functions, kernel declarations + definitions)."""
    first_helper = src.find("__forceinline__ __device__")
    first_kernel = src.find('extern "C" __global__')
    if first_kernel < 0:
        raise ValueError("no __global__ kernel in the generated CUDA source")
    cut = first_helper if 0 <= first_helper < first_kernel else first_kernel
    helpers = _HELPER.findall(src[cut:first_kernel])
    return src[:cut], helpers, src[first_kernel:]


def merge_sources(named: dict[str, str]) -> list[tuple[str, list[str]]]:
    """Group kernels by identical preamble into translation units: [(source, kernel names)]."""
    units: dict[str, dict] = {}
    for name, src in named.items():
        pre, helpers, body = _split(src)
        u = units.setdefault(pre, {"helpers": {}, "bodies": [], "names": []})
        for h in helpers:
            u["helpers"].setdefault(h.split("\n", 1)[0], h)
        u["bodies"].append(_KERNEL_NAME.sub(f"{name}_kernel", body))
        u["names"].append(name)
    return [(pre + "".join(u["helpers"].values()) + "\n".join(u["bodies"]), u["names"])
            for pre, u in units.items()]


@dataclass
class Resources:
    registers: int
    smem: int
    spill_stores: int
    spill_loads: int
    barriers: int


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict[str, Resources]:
    """Per-kernel resources from ``ptxas -v`` output."""
    out, current, spills = {}, None, (0, 0)
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current, spills = m.group(1), (0, 0)
        elif (m := _SPILL.search(line)) and current:
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := _USED.search(line)) and current:
            out[current] = Resources(int(m.group(1)), int(m.group(3) or 0), spills[0], spills[1],
                                     int(m.group(2) or 0))
            current = None
    return out


@dataclass
class CompileResult:
    arch: str
    ptx: str  # all units' PTX, concatenated
    resources: dict[str, Resources]
    seconds: float


def compile_many(named: dict[str, str], arch: str, workdir: str | os.PathLike | None = None,
                 nvcc: str | None = None) -> CompileResult:
    """nvcc -ptx then ptxas -v for every unit of `merge_sources(named)`; raises
    RuntimeError with the compiler's output when either fails."""
    import time

    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (looked on PATH and in /usr/local/cuda/bin)")
    ptxas = str(Path(nvcc).with_name("ptxas"))
    t0 = time.perf_counter()
    ptx_all, res = [], {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, (src, _names) in enumerate(merge_sources(named)):
            cu, ptx, cubin = (Path(tmp) / f"unit{i}{ext}" for ext in (".cu", ".ptx", ".cubin"))
            cu.write_text(src)
            for cmd in ([nvcc, "-ptx", f"-arch={arch}", "-w", "-o", str(ptx), str(cu)],
                        [ptxas, "-v", f"-arch={arch}", "-o", str(cubin), str(ptx)]):
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr[-4000:]}")
            ptx_all.append(ptx.read_text())
            res.update(parse_ptxas(r.stdout + r.stderr))
    return CompileResult(arch, "\n".join(ptx_all), res, time.perf_counter() - t0)


def ptx_functions(ptx: str) -> dict[str, str]:
    """PTX text of each ``.entry`` (kernel name -> body), to check one kernel's instructions."""
    parts = re.split(r"^\.visible \.entry (\w+)\(", ptx, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def check_resources(r: Resources, arch: str, threads: int) -> list[str]:
    """Violations of the architecture's per-block limits (empty when the kernel fits)."""
    lim, bad = ARCH_LIMITS[arch], []
    if r.registers > lim["regs_per_thread"]:
        bad.append(f"{r.registers} registers > {lim['regs_per_thread']}")
    if r.registers * threads > 65536:
        bad.append(f"{r.registers} registers x {threads} threads > 65536 per block")
    if r.smem > min(lim["smem_per_block"], 48 * 1024):
        bad.append(f"{r.smem} bytes static shared memory > 48 KiB")
    if r.spill_stores or r.spill_loads:
        bad.append(f"spills: {r.spill_stores} B stored, {r.spill_loads} B loaded")
    return bad
