"""Which compiled kernel runs a packed linear for M tokens.

A linear's weight is packed once for one formulation (bit-serial or table); for each
M bucket (1, 16, 128 tokens) the runtime takes the fastest schedule of that formulation
from the tuning log, tuning the key first when allowed, and the compiled kernel from the
disk cache. Kernels are shared by every linear of the same shape in the process.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading

from ..codegen.compute import KernelShape
from ..codegen.kernel import Kernel
from ..codegen.tuning import (M_BUCKETS, TuningLog, default_unpack_params, load_or_build, m_bucket,
                              tune, tuning_key, vnni_fits)
from ..codegen.vnni import VNNI_DEFAULT
from ..codegen.vnni_gemm import GEMM_DEFAULT
from .format import QuantFormat

log = logging.getLogger("abqc")

#: the schedule of the integer formulations where the log knows nothing and tuning is off
DEFAULT_PARAMS = {"order": "k_inner", "n_tile": 16, "m_outer": True}


def _default(formulation: str, m: int) -> dict:
    if formulation == "vnni":  # GEMV, or a 4 x 4 register block of rows x tokens for prefill
        return dict(VNNI_DEFAULT) if m_bucket(m) == 1 else dict(GEMM_DEFAULT)
    return default_unpack_params(m) if formulation == "unpack" else dict(DEFAULT_PARAMS)


def untuned_formulation(shape: KernelShape) -> str:
    """Where the log knows nothing: ``vnni`` (exact, fastest here at every M bucket, see
    `bench/kernels.py`) when this CPU and the format allow it, else ``unpack``."""
    return "vnni" if vnni_fits(shape) else "unpack"

_lock = threading.Lock()
_kernels: dict[tuple[str, int], Kernel] = {}


def tuning_enabled() -> bool:
    """Whether a compile tunes kernel keys the log does not know: only with ``ABQC_TUNE=1``
    (or ``tune=True``). By default a compile takes schedules from the log, else the defaults
    (`untuned_formulation`, `_default`), and never spends minutes measuring; ``abqc tune``
    does the full search."""
    return os.environ.get("ABQC_TUNE", "0") in ("1", "true", "yes")


@functools.lru_cache(maxsize=1)
def _log() -> TuningLog:
    return TuningLog()


def reset() -> None:
    """Forget loaded kernels and the cached tuning log (tests; a changed ABQC_CACHE)."""
    with _lock:
        _kernels.clear()
    _log.cache_clear()


def best_formulation(shape: KernelShape, tune_missing: bool | None = None) -> str:
    """The formulation to pack a weight for (one packing serves every M bucket): the one
    whose best schedules lose least against each bucket's winner (geometric mean), from
    the tuning log (tuned first when allowed); `untuned_formulation` when nothing is known."""
    tune_missing = tuning_enabled() if tune_missing is None else tune_missing
    recs = []
    for b in M_BUCKETS:
        rec = _log().get(tuning_key(shape, b))
        if rec is None and tune_missing:
            rec = tune(shape, b, _log())
        if rec is not None:
            recs.append(rec)
    if not recs:
        return untuned_formulation(shape)
    score: dict[str, float] = {}
    for rec in recs:
        best: dict[str, float] = {}
        for c in rec.get("candidates", []):
            best[c["formulation"]] = min(best.get(c["formulation"], float("inf")), c["ms"])
        for form, ms in best.items():
            score[form] = score.get(form, 0.0) + math.log(ms / rec["ms"])
    complete = {f: v for f, v in score.items()
                if all(any(c["formulation"] == f for c in r.get("candidates", [])) for r in recs)}
    return min(complete or score, key=(complete or score).get) if score else recs[0]["formulation"]


def schedule_for(fmt: QuantFormat, m: int) -> tuple[str, dict]:
    """(tuning key, schedule params) for `fmt` at M tokens, restricted to its formulation."""
    key = tuning_key(fmt.shape, m)
    rec = _log().get(key)
    if rec is None:
        return key, _default(fmt.formulation, m)
    same = [c for c in rec.get("candidates", []) if c["formulation"] == fmt.formulation]
    if rec["formulation"] == fmt.formulation:
        return key, dict(rec["params"])
    return key, (dict(min(same, key=lambda c: c["ms"])["params"]) if same
                 else _default(fmt.formulation, m))


def kernel(fmt: QuantFormat, m: int, spec: str | None = None) -> Kernel:
    """The compiled kernel for `fmt` (whose string is `spec`, if at hand) at M tokens
    (loaded once per process)."""
    bucket = m_bucket(m)
    ck = (spec or str(fmt), bucket)
    k = _kernels.get(ck)
    if k is None:
        with _lock:
            k = _kernels.get(ck)
            if k is None:
                _, params = schedule_for(fmt, bucket)
                k = load_or_build(fmt.shape, bucket, fmt.formulation, params)
                _kernels[ck] = k
    return k


def prepare(fmt: QuantFormat, tune_missing: bool | None = None) -> dict[int, str]:
    """Tune (if allowed) and load the kernels of every M bucket; bucket -> tuning key used."""
    tune_missing = tuning_enabled() if tune_missing is None else tune_missing
    keys = {}
    for b in M_BUCKETS:
        if tune_missing and _log().get(tuning_key(fmt.shape, b)) is None:
            tune(fmt.shape, b, _log())
        keys[b] = kernel(fmt, b).key
    return keys
