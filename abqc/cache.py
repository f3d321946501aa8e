"""Where abqc keeps converted models, tuning logs and compiled kernels.

One root for everything: ``$ABQC_CACHE`` if set, else ``~/.cache/abqc``.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``<cache root>/<parts...>``."""
    root = Path(os.environ.get("ABQC_CACHE") or Path.home() / ".cache" / "abqc")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
