"""TVM's thread pool, set on purpose.

TVM's pool and torch's each want every core; in one process they slow each other down
(and under outside load TVM's spinning workers degrade badly). `configure` sets TVM's
thread count explicitly: ``$ABQC_TVM_THREADS``, else the argument, else torch's count.
"""
from __future__ import annotations

import os

import tvm


def configure(threads: int | None = None) -> int:
    """Ask TVM's pool for `n` workers (mode 1: big cores) and return n. Not yet verified
    to take effect after the pool has started: bench/ measures it (issue 5)."""
    import torch

    n = int(os.environ.get("ABQC_TVM_THREADS") or threads or torch.get_num_threads())
    tvm.get_global_func("runtime.config_threadpool")(1, n)
    return n
