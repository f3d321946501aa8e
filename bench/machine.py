"""Describe the machine a benchmark ran on (written into every result JSON)."""
from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_features() -> dict:
    """Vendor and the SIMD features the kernels care about, read from /proc/cpuinfo."""
    vendor, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {"vendor": vendor, "features": [f for f in keep if f in flags]}


def machine_info() -> dict:
    import torch

    info = {"cpu": cpu_model(), **cpu_features(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__))
        info["git"] = out.stdout.strip() or None
    except OSError:
        pass
    return info
