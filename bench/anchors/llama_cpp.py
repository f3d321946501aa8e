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
    python bench/anchors/llama_cpp.py convert MODEL_DIR OUT.gguf   # convert_hf_to_gguf.py, f32

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


def run(name: str, *args: str, timeout: float | None = None, nice: int = 0) -> str:
    """Run tool `name` with `args`; its stdout+stderr (`LlamaCppError` with the tail on failure)."""
    cmd = ([ "nice", "-n", str(nice)] if nice else []) + [str(bin(name)), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise LlamaCppError(f"{' '.join(cmd)} exited {p.returncode}:\n{out[-3000:]}")
    return out


def convert_hf(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32") -> Path:
    """llama.cpp's convert_hf_to_gguf.py (from the same sources) on a saved HF model dir."""
    d = build_dir()
    script = d / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LlamaCppError(f"{script} missing; run: python bench/anchors/llama_cpp.py build")
    env = {**os.environ, "PYTHONPATH": f"{d / 'gguf-py'}{os.pathsep}{d}", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(out),
                        "--outtype", outtype], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise LlamaCppError(f"convert_hf_to_gguf.py exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    return Path(out)


def quantize(src: str | os.PathLike, out: str | os.PathLike, qtype: str, imatrix: str | None = None,
             pure: bool = False, token_embedding_type: str | None = None,
             output_tensor_type: str | None = None, threads: int = 2) -> Path:
    """llama-quantize `src` -> `out` at `qtype` (requantizing allowed)."""
    args = ["--allow-requantize"]
    if imatrix:
        args += ["--imatrix", str(imatrix)]
    if pure:
        args += ["--pure"]
    if token_embedding_type:
        args += ["--token-embedding-type", token_embedding_type]
    if output_tensor_type:
        args += ["--output-tensor-type", output_tensor_type]
    run("llama-quantize", *args, src, out, qtype, str(threads))
    return Path(out)


def imatrix(model: str | os.PathLike, text_file: str | os.PathLike, out: str | os.PathLike,
            ctx: int = 512, chunks: int | None = None, threads: int = 2) -> Path:
    """llama-imatrix on `text_file` (abqc's calibration text) -> importance matrix `out`."""
    args = ["-m", model, "-f", text_file, "-o", out, "-c", ctx, "-t", threads, "--no-ppl"]
    if chunks:
        args += ["--chunks", chunks]
    run("llama-imatrix", *args)
    return Path(out)


_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(model: str | os.PathLike, text_file: str | os.PathLike, ctx: int = 2048,
               chunks: int = 32, threads: int = 2, batch: int = 2048) -> dict:
    """llama-perplexity (``-c ctx --chunks chunks``): {"ppl", "ppl_stderr", "seconds"}."""
    t0 = __import__("time").perf_counter()
    out = run("llama-perplexity", "-m", model, "-f", text_file, "-c", ctx, "--chunks", chunks,
              "-t", threads, "-b", batch)
    m = _PPL.search(out)
    if not m:
        raise LlamaCppError(f"llama-perplexity printed no final estimate:\n{out[-2000:]}")
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)),
            "seconds": __import__("time").perf_counter() - t0}


def llama_bench(gguf_path: str | os.PathLike, prompt: int = 512, gen: int = 32, depth: int = 512,
                threads: int = 2, repetitions: int = 3) -> dict:
    """llama-bench ``-p prompt -n gen -d depth -t threads`` on `gguf_path`.

    Returns {"pp_tokens_per_s", "pp_seconds" (prefill of `prompt` tokens after `depth`),
    "tg_tokens_per_s", "tg_ms_per_token" (decode at context depth+prompt.. as llama-bench
    counts it), "load_avg_before", "raw" (llama-bench's JSON rows), "llama_cpp" (build.json)}.
    Times depend on the machine's load: `load_avg_before` is os.getloadavg() at the start."""
    load = os.getloadavg()
    out = run("llama-bench", "-m", gguf_path, "-p", prompt, "-n", gen, "-d", depth,
              "-t", threads, "-r", repetitions, "-o", "json")
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    res = {"load_avg_before": load, "raw": rows, "llama_cpp": {k: v for k, v in info().items()
                                                                 if k != "dir"}}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            res["pp_tokens_per_s"] = r["avg_ts"]
            res["pp_seconds"] = prompt / r["avg_ts"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            res["tg_tokens_per_s"] = r["avg_ts"]
            res["tg_ms_per_token"] = 1000.0 / r["avg_ts"]
    return res


def generate(gguf_path: str | os.PathLike, prompt: str, n: int = 32, threads: int = 2) -> str:
    """Greedy text from llama-completion (llama.cpp runs the file end to end)."""
    return run("llama-completion", "-m", gguf_path, "-p", prompt, "-n", n, "-t", threads,
               "--temp", "0", "-no-cnv", "--no-warmup")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["build", "info", "convert"])
    ap.add_argument("paths", nargs="*", help="convert: MODEL_DIR OUT.gguf")
    ap.add_argument("--outtype", default="f32", help="convert: f32, f16, bf16, q8_0")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    if a.cmd == "convert":
        if len(a.paths) != 2:
            ap.error("convert takes MODEL_DIR OUT.gguf")
        print(convert_hf(a.paths[0], a.paths[1], a.outtype))
        sys.exit(0)
    if a.cmd == "build":
        print(build(jobs=a.jobs, force=a.force))
    print(json.dumps(info(), indent=2))
