"""Compile generated CUDA source with nvcc and launch it through the CUDA driver API.

Why not TVM's own CUDA runtime: the PyPI wheel's ``libtvm_runtime_cuda.so`` links the
system's ``libcudart.so.13`` (a torch install brings its own CUDA runtime, not that one),
compiles the source with NVRTC in every new process, and launches on its own stream, which
would need synchronising with torch's. TVM still writes the kernel (`template`,
`compile.cuda_source`); this file turns that source into a cubin (``nvcc -cubin``, cached
by the source's hash under ``$ABQC_CACHE/cuda``) and launches it with ``cuLaunchKernel`` on
torch's current stream (so CUDA graphs capture it too), binding torch tensors to the
kernel's parameters by name (``X_ptr``, ``sx_ptr``, ...). Nothing here imports TVM, so a machine with only torch, nvcc and a driver can run kernels
whose source was generated elsewhere.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\((.*?)\)\s*[;{]',
                        re.S)


@dataclass(frozen=True)
class KernelSignature:
    entry: str
    params: tuple[tuple[str, str], ...]  # (name, C type) in the kernel's order
    threads: int | None  # from __launch_bounds__


def parse_signature(source: str, entry: str | None = None) -> KernelSignature:
    """The parameters of `entry` (or the only ``__global__`` kernel) in a CUDA source."""
    found = {}
    for m in _SIGNATURE.finditer(source):
        params = []
        for p in m.group(3).split(","):
            p = p.replace("__restrict__", " ").strip()
            ctype, name = p.rsplit(None, 1)
            params.append((name.lstrip("*"), " ".join(ctype.split()) + ("*" if name.startswith("*") else "")))
        found[m.group(2)] = KernelSignature(m.group(2), tuple(params),
                                            int(m.group(1)) if m.group(1) else None)
    if not found:
        raise ValueError("no extern \"C\" __global__ kernel in the CUDA source")
    if entry is None:
        if len(found) != 1:
            raise ValueError(f"several kernels {sorted(found)}: name the entry")
        return next(iter(found.values()))
    if entry not in found:
        raise ValueError(f"kernel {entry!r} not in the source (has {sorted(found)})")
    return found[entry]


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def _cache_dir() -> Path:
    from ...cache import cache_root  # $ABQC_CACHE, $XDG_CACHE_HOME/abqc or ~/.cache/abqc

    return cache_root() / "cuda"


def compile_cubin(source: str, arch: str, nvcc: str | None = None) -> bytes:
    """``nvcc -cubin -arch=<arch>`` of `source`, cached by (source, arch, nvcc version)."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (looked on PATH and in /usr/local/cuda/bin); the CUDA "
                           "kernels are compiled with it when first used")
    key = hashlib.sha256(f"{arch}\0{nvcc}\0{source}".encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.{arch}.cubin"
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cu, out = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        cu.write_text(source)
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-w", "-o", str(out), str(cu)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr[-4000:]}")
        os.replace(out, path)  # atomic: a reader never sees half a cubin
    return path.read_bytes()


class _Driver:
    """The few driver-API calls needed, through ctypes (libcuda ships with the driver)."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def check(self, rc: int, what: str) -> None:
        if rc:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


_driver: _Driver | None = None


def _lib() -> _Driver:
    global _driver
    if _driver is None:
        _driver = _Driver()
    return _driver


_modules: dict[tuple[str, int], tuple[ctypes.c_void_p, object]] = {}


def _module(cubin: bytes, device: torch.device) -> ctypes.c_void_p:
    """The loaded module of `cubin` on `device` (loaded once: a merged unit holds many kernels)."""
    key = (hashlib.sha256(cubin).hexdigest(), device.index)
    if key not in _modules:
        d = _lib()
        with torch.cuda.device(device):
            torch.empty(1, device=device)  # makes torch's (primary) context current
            image = ctypes.create_string_buffer(cubin, len(cubin))
            handle = ctypes.c_void_p()
            d.check(d.lib.cuModuleLoadData(ctypes.byref(handle), image), "cuModuleLoadData")
        _modules[key] = (handle, image)
    return _modules[key][0]


class CudaFunction:
    """One kernel of a loaded cubin on the device's primary context (the one torch uses)."""

    def __init__(self, cubin: bytes, signature: KernelSignature, device=None):
        d = _lib()
        self.signature = signature
        index = torch.cuda.current_device() if device is None else (torch.device(device).index or 0)
        self.device = torch.device("cuda", index)
        self.func = ctypes.c_void_p()
        d.check(d.lib.cuModuleGetFunction(ctypes.byref(self.func), _module(cubin, self.device),
                                          signature.entry.encode()), f"cuModuleGetFunction({signature.entry})")

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: dict,
                 shared_bytes: int = 0) -> None:
        """Launch on torch's current stream; `args` maps every parameter name (``X_ptr`` or
        ``X``) to a CUDA tensor (contiguous, on this device) or a Python int."""
        values, holders = [], []
        for name, ctype in self.signature.params:
            v = args.get(name, args.get(name[:-4] if name.endswith("_ptr") else name))
            if v is None:
                raise ValueError(f"no argument for kernel parameter {name!r} ({ctype})")
            if isinstance(v, torch.Tensor):
                if v.device != self.device or not v.is_contiguous():
                    raise ValueError(f"argument {name!r} must be a contiguous tensor on {self.device}, "
                                     f"got device={v.device}, contiguous={v.is_contiguous()}")
                h = ctypes.c_void_p(v.data_ptr())
            elif ctype in ("int", "int32_t"):
                h = ctypes.c_int32(int(v))
            else:
                raise ValueError(f"argument {name!r}: {type(v).__name__} for a {ctype} parameter")
            holders.append(h)
            values.append(ctypes.c_void_p(ctypes.addressof(h)))
        params = (ctypes.c_void_p * len(values))(*values)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        d = _lib()
        d.check(d.lib.cuLaunchKernel(self.func, *map(ctypes.c_uint, grid), *map(ctypes.c_uint, block),
                                     ctypes.c_uint(shared_bytes), ctypes.c_void_p(stream), params, None),
                f"cuLaunchKernel({self.signature.entry}, grid={grid}, block={block})")


def load(source: str, arch: str, entry: str | None = None, device=None) -> CudaFunction:
    """Source -> cubin (cached) -> a launchable kernel."""
    return CudaFunction(compile_cubin(source, arch), parse_signature(source, entry), device)


__all__ = ["CudaFunction", "KernelSignature", "compile_cubin", "load", "nvcc_path", "parse_signature"]
