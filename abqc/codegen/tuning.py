"""Auto-tuning: per (target, M bucket, N, K, wbits, abits, group) pick the formulation and
schedule that runs fastest here, and remember it in a log a person can read and reuse.

The log is JSON lines under ``<cache>/tuning/kernels.jsonl``: one record per tuned key
(key, formulation, schedule parameters, time in ms, every candidate's time, date, TVM
version, target). A key already in the log is never re-tuned; compiled kernels are kept
under ``<cache>/kernels/`` so a second run compiles nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import tvm

from ..atomic import write_text
from ..cache import cache_dir
from .build import build, host_target
from .compute import FORMULATIONS, WO_FORMULATIONS, KernelShape
from .kernel import Kernel, pack_weight
from .tuning_log import TuningLog  # noqa: F401  (re-exported)
from .schedule import ORDERS
from .vnni import N_TILES as VNNI_TILES, VNNI_DEFAULT, vnni_supported
from .vnni_gemm import BLOCKS as VNNI_BLOCKS

log = logging.getLogger("abqc")

#: token counts the kernels are tuned for; a call with M tokens uses the nearest bucket above
M_BUCKETS = (1, 16, 128)


def m_bucket(m: int) -> int:
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def target_name(target=None) -> str:
    t = target or host_target()
    cfg = t.export() if hasattr(t, "export") else {}
    return f"{cfg.get('kind', 'llvm')}-{cfg.get('mcpu', 'generic')}-{cfg.get('num-cores', 1)}c"


def tuning_key(shape: KernelShape, m: int, target=None) -> str:
    return (f"{target_name(target)}|m{m_bucket(m)}|n{shape.n}|k{shape.k}|w{shape.wbits}"
            f"|a{shape.abits}|g{shape.group_size}")


def unpack_candidates(m: int) -> list[dict[str, Any]]:
    """`unpack` schedules: in-register decoding for decode-sized M, decoded panels and
    register blocks of several rows for prefill."""
    if m_bucket(m) == 1:
        return [{"decode": "inline", "n_tile": t, "m_tile": 1} for t in (16, 32, 64)]
    return [{"decode": "panel", "n_tile": t, "m_tile": mt, "k_unroll": ku}
            for t in (16, 32) for mt in (4, 6) for ku in (1, 4)] + \
        [{"decode": "inline", "n_tile": 32, "m_tile": 4}]


def default_unpack_params(m: int) -> dict[str, Any]:
    """The untuned schedule: the best of a probe on AVX2 (2 cores), per M bucket."""
    if m_bucket(m) == 1:
        return {"decode": "inline", "n_tile": 32, "m_tile": 1}
    return {"decode": "panel", "n_tile": 16, "m_tile": 6, "k_unroll": 4}


def vnni_fits(shape: KernelShape) -> bool:
    """Whether the `vnni` formulation can run `shape` on this CPU."""
    return shape.abits <= 8 and not shape.group_size and vnni_supported()


def candidates(shape: KernelShape, m: int) -> list[tuple[str, dict[str, Any]]]:
    """The search space: every formulation that fits the activation width, each with its
    schedule knobs (loop order x n tile x m placement; `unpack`: decoding x register block)."""
    forms = WO_FORMULATIONS if shape.abits == 16 else FORMULATIONS
    out = [("unpack", p) for p in unpack_candidates(m)]
    if vnni_fits(shape):
        if m_bucket(m) == 1:
            out += [("vnni", {"n_tile": t, "chains": c}) for t in VNNI_TILES for c in (1, 2)]
        else:  # register blocks of rows x tokens (`vnni_gemm`), and the GEMV kernel's default:
            # of the 82 GEMM rows vnni won in bench/kernels.py, a GEMV schedule won 5, each by
            # under 3%, and each GEMV candidate costs up to a minute to build (fully unrolled)
            out += [("vnni", dict(VNNI_DEFAULT))]
            out += [("vnni", {"n_tile": nt, "m_tile": mt}) for nt, mt in VNNI_BLOCKS]
    for form in forms:
        for order in ORDERS:
            if order == "bits_inner" and form.endswith("lut"):
                continue  # one bit loop: same as k_inner
            for n_tile in (8, 16, 32):
                for m_outer in ((True, False) if m_bucket(m) > 1 else (True,)):
                    out.append((form, {"order": order, "n_tile": n_tile, "m_outer": m_outer}))
    return out


def _random_case(shape: KernelShape, m: int, formulation: str):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << shape.wbits, (shape.n, shape.k), generator=g).to(torch.uint8)
    g_count = shape.groups
    w = pack_weight(codes, torch.rand(shape.n, g_count, generator=g) + 0.5,
                    torch.zeros(shape.n, g_count), shape, formulation)
    x = torch.randn(m, shape.k, generator=g)
    return x, w


def measure(kernel: Kernel, m: int, min_seconds: float = 0.05) -> float:
    """Median ms of the kernel's ``main`` (activation packing excluded) on random data."""
    x, w = _random_case(kernel.shape, m, kernel.formulation)
    data, act = kernel.activation_inputs(x, False)
    y = torch.empty(data.shape[0] if kernel.weight_only else m, kernel.shape.n)
    args = [data, w.data]
    args += [w.scale, w.zero, act[0], y] if kernel.weight_only else \
        [act[0], act[1], act[2], w.scale, w.zero, w.sumw, w.kg, y]
    dl = [tvm.runtime.from_dlpack(a.contiguous()) for a in args]
    if kernel.formulation == "unpack":
        dl.append(data.shape[0] // kernel.m_tile)
    mod = getattr(kernel.ex, "mod", kernel.ex)
    f = mod.time_evaluator("main", tvm.cpu(), number=1, repeat=5,
                           min_repeat_ms=int(min_seconds * 1000))
    return float(np.median(f(*dl).results) * 1e3)


@functools.lru_cache(maxsize=1)
def codegen_fingerprint() -> str:
    """A hash of the code generator's sources: a cached kernel built by other code is never loaded."""
    h = hashlib.sha1()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _kernel_path(key: str, formulation: str, params: dict) -> Path:
    digest = hashlib.sha1(json.dumps([key, formulation, params, tvm.__version__, codegen_fingerprint()],
                                     sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("kernels") / f"{digest}.so"


#: the most bytes a cached kernel may have (a digest is computed over all of it)
MAX_KERNEL_BYTES = 256 << 20


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            size += len(block)
            if size > MAX_KERNEL_BYTES:
                raise ValueError(f"larger than {MAX_KERNEL_BYTES} bytes")
            h.update(block)
    return size, h.hexdigest()


def cached_kernel_ok(path: Path) -> str | None:
    """Why the cached shared object at `path` must not be loaded (None: it is the one abqc
    wrote). The digest beside it (``<name>.so.sha256``: size and sha256) is checked before
    anything is dlopen'ed, so a truncated, swapped or garbage file is never loaded."""
    import stat as _stat

    dpath = _digest_path(path)
    try:
        st = os.lstat(path)
        if not _stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        want = dpath.read_text(encoding="utf-8").split() if dpath.is_file() and \
            dpath.stat().st_size < 256 else None
        if not want or len(want) != 2 or not want[0].isdigit():
            return f"its digest file {dpath.name} is missing or damaged"
        if int(want[0]) != st.st_size:
            return f"it has {st.st_size} bytes, its digest says {want[0]} (truncated?)"
        size, digest = _file_digest(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"it cannot be read ({e})"
    if digest != want[1]:
        return "its sha256 does not match its digest (modified or swapped)"
    return None


def _write_cached(ex, path: Path) -> None:
    """Export `ex` beside `path`, write its digest, then rename both into place."""
    fd, tmp = tempfile.mkstemp(prefix=".kernel.", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        ex.export_library(tmp)
        size, digest = _file_digest(Path(tmp))
        write_text(_digest_path(path), f"{size} {digest}\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_or_build(shape: KernelShape, m: int, formulation: str, params: dict, target=None) -> Kernel:
    """The compiled kernel from the on-disk cache (only if it matches the digest written
    beside it), or built now and cached."""
    key = tuning_key(shape, m, target)
    path = _kernel_path(key, formulation, params)
    if os.path.lexists(path):
        why = cached_kernel_ok(path)
        if why is None:
            return Kernel(tvm.runtime.load_module(str(path)), formulation, shape, params, key)
        log.warning("cached kernel %s is not loaded: %s; rebuilding it", path, why)
        for p in (path, _digest_path(path)):
            with contextlib.suppress(OSError):
                os.unlink(p)
    ex = build(formulation, shape, params, target, functions=("main",))
    _write_cached(ex, path)
    return Kernel(ex, formulation, shape, params, key)


def _candidate_id(formulation: str, params: dict) -> str:
    return json.dumps([formulation, params], sort_keys=True)


def tune(shape: KernelShape, m: int, tuning_log: TuningLog | None = None, target=None,
         space: Iterable[tuple[str, dict]] | None = None, progress: bool = False,
         extend: bool = False) -> dict:
    """Measure every candidate for (shape, M bucket), log the best; known keys return at once.

    With `extend`, a known key measures the candidates its record has not tried (schedules a
    newer abqc added) and keeps the fastest of old and new; nothing else re-tunes a key."""
    tuning_log = tuning_log or TuningLog()
    key = tuning_key(shape, m, target)
    known = tuning_log.get(key)
    if known is not None and not extend:
        return known
    mb = m_bucket(m)
    cands = list(space if space is not None else candidates(shape, mb))
    if known is not None:
        seen = {_candidate_id(c["formulation"], c["params"]) for c in known.get("candidates", [])}
        cands = [(f, p) for f, p in cands if _candidate_id(f, p) not in seen]
        if not cands:
            return known
    tried = []
    t0 = time.perf_counter()
    for form, params in cands:
        kern = Kernel(build(form, shape, params, target, functions=("main",)), form, shape, params, key)
        ms = measure(kern, mb)
        tried.append({"formulation": form, "params": params, "ms": round(ms, 5)})
        if progress:
            log.info("  %-13s %-40s %.4f ms", form, json.dumps(params), ms)
    if known is not None:
        log.info("extending %s: %d new candidates beside %d tried on %s", key, len(tried),
                 len(known.get("candidates", [])), known.get("date", "?")[:10])
        tried = known.get("candidates", []) + tried
    best = min(tried, key=lambda r: r["ms"])
    record = {"key": key, "formulation": best["formulation"], "params": best["params"],
              "ms": best["ms"], "m": mb, "shape": {"n": shape.n, "k": shape.k, "wbits": shape.wbits,
                                                   "abits": shape.abits, "group_size": shape.group_size},
              "candidates": tried, "tuning_seconds": round(time.perf_counter() - t0, 2),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "tvm": tvm.__version__, "target": str(target or host_target())}
    tuning_log.add(record)
    log.info("tuned %s: %s %s %.4f ms (%d candidates, %.1fs)", key, best["formulation"],
             json.dumps(best["params"]), best["ms"], len(tried), record["tuning_seconds"])
    return record


def kernel_for(shape: KernelShape, m: int, tuning_log: TuningLog | None = None,
               tune_missing: bool = True, target=None) -> Kernel:
    """The best known kernel for (shape, M): from the log (tuning it first if allowed and
    missing, else a sensible default schedule), compiled from the disk cache when there."""
    tuning_log = tuning_log or TuningLog()
    rec = tuning_log.get(tuning_key(shape, m, target))
    if rec is None and tune_missing:
        rec = tune(shape, m, tuning_log, target)
    if rec is None:
        rec = {"formulation": "unpack", "params": default_unpack_params(m)}
    return load_or_build(shape, m, rec["formulation"], rec["params"], target)
