"""The manifest of a saved abqc model: every file of the directory, config.json included,
with its size and sha256 (torch-free).

``abqc_manifest.json`` is written last by `abqc.runtime.save.save` and checked by
`abqc.load` and by the transformers quantizer (``from_pretrained`` after ``import abqc``)
before anything is parsed into a model. Names are confined to the directory (relative, no
``..``, no absolute paths), each must be a regular file of exactly the recorded size, and
every read is bounded by that size, so a manifest cannot make a load read outside the model
or hang on ``/dev/zero``. Files the manifest does not list that a loader would read
(weights, pickles, code, JSON configs) are refused too. This catches damage and mismatched
files; it is not a signature: whoever can write the directory can write a new manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MANIFEST = "abqc_manifest.json"
MANIFEST_FORMAT = "abqc-manifest-v1"
#: the most config.json / the manifest / a safetensors header may take
MAX_JSON_BYTES = 64 << 20
MAX_FILES = 10_000
#: unlisted files (top level) like these are refused: transformers, a tokenizer or pickle
#: would read them
LOADABLE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".py",
                     ".model", ".gguf", ".msgpack", ".h5", ".npz", ".npy", ".so", ".tiktoken")
LOADABLE_JSON = re.compile(r"config\.json|.*\.index\.json|.*_config\.json|tokenizer.*\.json|"
                           r"special_tokens_map\.json|added_tokens\.json|vocab\.json|"
                           r"chat_template\.json|merges\.txt|vocab\.txt")


def loadable(name: str) -> bool:
    """Whether a loader (transformers, a tokenizer) would read a top-level file of this name."""
    return Path(name).suffix in LOADABLE_SUFFIXES or bool(LOADABLE_JSON.fullmatch(name))
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")


class CorruptCheckpointError(ConfigError):
    """A saved abqc model whose files do not match what was written."""


def _regular_file(path: Path, what: str = "") -> os.stat_result:
    """`path`'s stat, if it is a regular file (never a device, FIFO or directory)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing: the saved model is incomplete") from None
    if not stat.S_ISREG(st.st_mode):
        raise CorruptCheckpointError(f"{path} is not a regular file{what}; refusing to read it")
    return st


def read_bounded(path: str | os.PathLike, limit: int = MAX_JSON_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (never a device, FIFO or directory)."""
    path = Path(path)
    st = _regular_file(path, f" ({what})")
    if st.st_size > limit:
        raise CorruptCheckpointError(f"{path} has {st.st_size} bytes, more than the {limit} a "
                                     f"{what} may have; refusing to read it")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CorruptCheckpointError(f"{path} grew past {limit} bytes while being read")
    return data


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    data = read_bounded(path, MAX_JSON_BYTES, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path} is not UTF-8 text ({e}): the {what} is damaged") from None
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({e}): the {what} is damaged") from None


def sha256_bounded(path: str | os.PathLike, size: int, chunk: int = 1 << 20) -> str:
    """sha256 of the first `size` bytes of `path` (reads no more than that)."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def check_name(name: Any) -> str:
    """A manifest entry's name: relative, inside the directory, plain parts only."""
    if not isinstance(name, str) or not name or len(name) > 255 or "\\" in name or "\x00" in name:
        raise CorruptCheckpointError(f"manifest entry {name!r} is not a file name inside the "
                                     "model directory")
    if name.startswith("/") or os.path.isabs(name):
        raise CorruptCheckpointError(f"manifest entry {name!r} is an absolute path; entries "
                                     "must name files inside the model directory")
    parts = name.split("/")
    if any(p in ("", ".", "..") or not _PART.fullmatch(p) for p in parts):
        raise CorruptCheckpointError(f"manifest entry {name!r} leaves the model directory or has "
                                     "an odd name (parts must be plain names, no '..')")
    return name


def _files(directory: Path) -> list[str]:
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if rel == MANIFEST or p.is_dir() and not p.is_symlink():
            continue
        if p.is_symlink() or not p.is_file():
            raise ConfigError(f"{p} is not a regular file; a saved model holds regular files only")
        out.append(check_name(rel))
    return out


def write_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Write ``abqc_manifest.json`` listing every file under `directory` (size, sha256)."""
    from ..atomic import write_json

    directory = Path(directory)
    files = {}
    for name in _files(directory):
        size = (directory / name).stat().st_size
        files[name] = {"size": size, "sha256": sha256_bounded(directory / name, size)}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    write_json(directory / MANIFEST, manifest)
    return manifest


_verified: dict[tuple, bool] = {}


def verify_manifest(directory: str | os.PathLike) -> dict[str, dict]:
    """Check every file of a saved model against its manifest; raise `CorruptCheckpointError`
    naming the first missing, altered, unlisted or out-of-bounds one. Returns the entries."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not os.path.lexists(mpath):
        raise CorruptCheckpointError(
            f"{directory} has no {MANIFEST}: the saved model is incomplete, its manifest was "
            "deleted, or an abqc older than 0.2 wrote it; save the model again")
    manifest = read_json(mpath, "manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(files, dict):
        raise CorruptCheckpointError(f"{mpath} is not an abqc manifest (expected format "
                                     f"{MANIFEST_FORMAT!r} and a 'files' table)")
    if len(files) > MAX_FILES:
        raise CorruptCheckpointError(f"{mpath} lists {len(files)} files, more than {MAX_FILES}")
    if "config.json" not in files:
        raise CorruptCheckpointError(f"{mpath} does not list config.json: it does not cover the model")
    stats = []
    for name, entry in files.items():
        check_name(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) \
                or isinstance(entry.get("size"), bool) or entry["size"] < 0 \
                or not isinstance(entry.get("sha256"), str) \
                or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise CorruptCheckpointError(f"{mpath}: entry {name!r} is {entry!r}, not "
                                         "{'size': <bytes>, 'sha256': <64 hex digits>}")
        path = directory / name
        st = _regular_file(path)
        if st.st_size != entry["size"]:
            raise CorruptCheckpointError(
                f"{path} has {st.st_size} bytes, the manifest says {entry['size']}: the file is "
                "truncated or was modified after abqc saved it; save the model again")
        stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino, entry["sha256"]))
    for p in directory.iterdir():
        if p.name not in files and p.name != MANIFEST and loadable(p.name):
            raise CorruptCheckpointError(
                f"{p} is not in the model's manifest, and a loader would read it: abqc did not "
                "write it; remove it or save the model again")
    key = (str(directory.resolve()), tuple(stats))
    if key in _verified:
        return files
    for name, size, _, _, digest in stats:
        got = sha256_bounded(directory / name, size)
        if got != digest:
            raise CorruptCheckpointError(
                f"{directory / name} does not match its checksum (sha256 {got[:12]}..., saved "
                f"{digest[:12]}...): the file is truncated or was modified after abqc saved it; "
                "save the model again")
    _verified[key] = True
    return files
