"""Where abqc keeps converted models, tuning logs and compiled kernels.

One root for everything: ``$ABQC_CACHE`` if set, else ``$XDG_CACHE_HOME/abqc`` if
``XDG_CACHE_HOME`` is set (the XDG base directory spec), else ``~/.cache/abqc``.
``abqc cache info`` lists what is there; ``abqc cache clear [NAME...]`` removes it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import ConfigError

#: What lives under the root, and what each part is (for ``abqc cache info``).
PARTS = {
    "models": "converted source models (the embedded SmolLM2 as safetensors)",
    "tuning": "the kernel tuning log (kernels.jsonl): clearing it means re-tuning",
    "kernels": "compiled CPU kernels (.so)",
    "cuda": "compiled CUDA kernels (.cubin)",
}


def cache_root() -> Path:
    """The cache root (not created)."""
    if os.environ.get("ABQC_CACHE"):
        return Path(os.environ["ABQC_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the spec: a relative value is invalid and ignored
        return Path(xdg) / "abqc"
    return Path.home() / ".cache" / "abqc"


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``<cache root>/<parts...>``."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _size(path: Path) -> tuple[int, int]:
    """(files, bytes) under `path` (symlinks not followed)."""
    if path.is_file() or path.is_symlink():
        return 1, path.lstat().st_size
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                size += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def info() -> list[dict]:
    """One row per entry of the root: name, files, bytes, what it is."""
    root = cache_root()
    if not root.is_dir():
        return []
    rows = []
    for p in sorted(root.iterdir()):
        files, size = _size(p)
        rows.append({"name": p.name, "files": files, "bytes": size,
                     "what": PARTS.get(p.name, "")})
    return rows


def clear(names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Remove the named entries of the root (none named: all of it); return what was removed.
    A name that is not there is refused, listing what is."""
    root = cache_root()
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    for n in names:
        if n not in present or "/" in n or n in (".", ".."):
            raise ConfigError(f"cache entry {n!r} is not in {root}; there: {present or 'nothing'}")
    removed = []
    for n in (names or present):
        p = root / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(n)
    return removed
