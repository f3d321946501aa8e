"""llama.cpp as the anchor of abqc's benchmarks: built once from a PyPI source distribution,
cached, and driven through its own tools (llama-bench, llama-perplexity, llama-quantize,
llama-imatrix, llama-cli, convert_hf_to_gguf.py).

Why from PyPI: this machine reaches package registries only, and ``llama-cpp-python``'s
sdist carries the full llama.cpp tree under ``vendor/llama.cpp``. The version is pinned
(`LLAMA_CPP_PYTHON`) so every result names the llama.cpp it ran.

Build flags: ``GGML_NATIVE=OFF`` with AVX/AVX2/BMI2/FMA/F16C on, the AVX-512 options on only
where /proc/cpuinfo has them, and ``GGML_AMX_*=OFF`` (llama.cpp's AMX path segfaults on
AMX CPUs in VMs); no OpenSSL, no web UI, static binaries. The cache key is the pinned
version plus the flags, so a second call (or another CPU family) finds its own build.

    python bench/anchors/llama_cpp.py build        # ~15 min on 2 cores, then cached
    python bench/anchors/llama_cpp.py info         # where it is, version, flags

Other scripts import it (``sys.path`` holding ``bench/``): ``from anchors import llama_cpp``
then `llama_bench`, `perplexity`, `quantize`, `imatrix`, `convert_hf`, `cli`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from abqc.cache import cache_dir  # noqa: E402

#: the PyPI package whose sdist carries llama.cpp (vendor/llama.cpp)
LLAMA_CPP_PYTHON = "0.3.36"
#: llama-cli needs the server library in this llama.cpp; llama-completion (the former
#: llama-cli) and llama-simple run a GGUF from the shell without it
TARGETS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-imatrix",
           "llama-completion", "llama-simple")
#: AVX-512 build options and the /proc/cpuinfo flag each needs
AVX512_OPTIONS = {"GGML_AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
                  "GGML_AVX512_VBMI": ("avx512vbmi",),
                  "GGML_AVX512_VNNI": ("avx512_vnni",),
                  "GGML_AVX512_BF16": ("avx512_bf16",)}


class LlamaCppError(RuntimeError):
    """A llama.cpp tool failed or is not built; the message names the command and its output."""


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_flags(cpu_flags: set[str] | None = None) -> dict[str, str]:
    """The CMake options of the build on this CPU (AVX-512 parts only where present)."""
    have = _cpu_flags() if cpu_flags is None else cpu_flags
    flags = {"CMAKE_BUILD_TYPE": "Release", "BUILD_SHARED_LIBS": "OFF", "GGML_NATIVE": "OFF",
             "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_BMI2": "ON", "GGML_FMA": "ON",
             "GGML_F16C": "ON",
             "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF",
             "GGML_OPENMP": "ON", "LLAMA_OPENSSL": "OFF", "LLAMA_CURL": "OFF",
             "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_SERVER": "OFF", "LLAMA_BUILD_UI": "OFF",
             "LLAMA_USE_PREBUILT_UI": "OFF", "LLAMA_BUILD_EXAMPLES": "ON",
             "LLAMA_BUILD_TOOLS": "ON"}
    for opt, need in AVX512_OPTIONS.items():
        flags[opt] = "ON" if all(f in have for f in need) else "OFF"
    if flags["GGML_AVX512"] == "OFF":  # the sub-options need AVX512F itself
        for opt in AVX512_OPTIONS:
            flags[opt] = "OFF"
    return flags


def build_key(flags: dict[str, str] | None = None) -> str:
    flags = build_flags() if flags is None else flags
    digest = hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:10]
    return f"llama-cpp-python-{LLAMA_CPP_PYTHON}-{digest}"


def build_dir(flags: dict[str, str] | None = None) -> Path:
    """``<abqc cache>/llama_cpp/<key>``: bin/, convert_hf_to_gguf.py, gguf-py/, build.json."""
    return cache_dir("llama_cpp") / build_key(flags)


def _fetch_sources(dest: Path) -> tuple[Path, str]:
    """Download the pinned sdist (pip, no binaries) and unpack it under `dest`;
    (llama.cpp dir, the sdist's sha256). Reuses an earlier unpack."""
    done = dest / "sdist.sha256"
    if done.is_file():
        return next(dest.glob("llama_cpp_python-*/vendor/llama.cpp")), done.read_text().strip()
    with tempfile.TemporaryDirectory(prefix="abqc-llama-cpp-sdist-") as t:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", t], check=True)
        sdists = list(Path(t).glob("llama_cpp_python-*.tar.gz"))
        if len(sdists) != 1:
            raise LlamaCppError(f"expected one llama_cpp_python sdist from pip, found {sdists}")
        sha = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(dest, filter="data")
    done.write_text(sha)
    return next(dest.glob("llama_cpp_python-*/vendor/llama.cpp")), sha


def _source_version(src: Path) -> dict:
    """What identifies the vendored llama.cpp without git: ggml's version and the sdist's."""
    info = {"llama_cpp_python": LLAMA_CPP_PYTHON}
    try:
        text = (src / "ggml" / "CMakeLists.txt").read_text()
        parts = [re.search(rf"set\(GGML_VERSION_{p}\s+(\d+)\)", text) for p in ("MAJOR", "MINOR", "PATCH")]
        if all(parts):
            info["ggml_version"] = ".".join(m.group(1) for m in parts)
    except OSError:
        pass
    return info


def build(jobs: int = 2, force: bool = False, nice: int = 15) -> Path:
    """Build (or find in the cache) llama.cpp's tools; returns the build directory.

    The directory holds ``bin/`` (the static tools of `TARGETS`), ``convert_hf_to_gguf.py``
    and ``gguf-py/`` from the same sources, and ``build.json`` (version, flags, the sdist's
    sha256). Sources and the CMake tree stay under ``work/`` until the build is complete,
    so an interrupted build resumes where it stopped."""
    flags = build_flags()
    out = build_dir(flags)
    if (out / "build.json").is_file() and not force:
        return out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    src, sha = _fetch_sources(work)
    bdir = work / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(bdir)] + [f"-D{k}={v}" for k, v in flags.items()],
                   check=True)
    subprocess.run(["nice", "-n", str(nice), "cmake", "--build", str(bdir), "--config", "Release",
                    "-j", str(jobs), "--target", *TARGETS], check=True)
    (out / "bin").mkdir(exist_ok=True)
    for name in TARGETS:
        shutil.copy2(bdir / "bin" / name, out / "bin" / name)
    shutil.copy2(src / "convert_hf_to_gguf.py", out / "convert_hf_to_gguf.py")
    for tree in ("gguf-py", "conversion"):  # what convert_hf_to_gguf.py imports beside it
        if (out / tree).exists():
            shutil.rmtree(out / tree)
        shutil.copytree(src / tree, out / tree)
    meta = {**_source_version(src), "sdist_sha256": sha, "flags": flags, "binaries": list(TARGETS)}
    (out / "build.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(work)
    return out


def info() -> dict:
    """build.json of the cached build for this CPU's flags (`LlamaCppError` if not built)."""
    p = build_dir() / "build.json"
    if not p.is_file():
        raise LlamaCppError(f"llama.cpp is not built for this CPU's flags ({p} missing); "
                            "run: python bench/anchors/llama_cpp.py build")
    return {**json.loads(p.read_text()), "dir": str(p.parent)}


def bin(name: str) -> Path:  # noqa: A001 (the brief's name)
    """Path of the built tool `name` (e.g. "llama-bench")."""
    p = build_dir() / "bin" / name
    if not p.is_file():
        built = info()["binaries"]
        raise LlamaCppError(f"llama.cpp tool {name!r} is not built; built: {built}")
    return p


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["build", "info"])
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    if a.cmd == "build":
        print(build(jobs=a.jobs, force=a.force))
    print(json.dumps(info(), indent=2))
