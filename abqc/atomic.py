"""Write files so that a crash never leaves one half-written: temp name, then rename."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- directories: build beside the target, then one atomic rename ---------------------------

#: marks the sibling directories a save builds in (`.<name>.abqc-tmp-<pid>-<random>`)
TMP_TAG = ".abqc-tmp-"
RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(target: str | os.PathLike) -> Path:
    """A new, empty sibling of `target` to build it in; stale ones of dead processes (a save
    killed with SIGKILL) are removed first. Made with the permissions a plain mkdir gives."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove what saves of `target` killed before they finished left beside it (only
    abqc's own files and hard links to files that are still in place)."""
    import re
    import shutil

    target = Path(target)
    pat = re.compile(rf"\.{re.escape(target.name)}{re.escape(TMP_TAG)}(\d+)-[^/]*")
    gone = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return gone
    for p in entries:
        m = pat.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone.append(p)
    return gone


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def link_tree(src: Path, dst: Path) -> None:
    """`dst` as a copy of `src` made of hard links (no data copied; the same files)."""
    import shutil

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
    else:
        os.link(src, dst)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_dir(staging: str | os.PathLike, target: str | os.PathLike, keep=()) -> None:
    """Put the directory `staging` at `target` in one atomic step: a reader (or a crash) sees
    the old target or the new one, never neither. Entries of the old target named in `keep`
    are carried into the new one as hard links first (their data is never copied or moved).
    Without atomic exchange (not Linux, or a file system without it) an existing non-empty
    target is moved aside and back, two renames."""
    staging, target = Path(staging), Path(target)
    for name in keep:
        link_tree(target / name, staging / name)
    for f in staging.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(staging)
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif exchange(staging, target):
        _remove(staging)  # now the old target
    elif target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        os.rename(staging, target)  # rename(2) replaces an empty directory atomically
    else:
        # (not under TMP_TAG: a crash between the renames leaves the old target here, and
        # `clean_stale` must never remove it)
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.abqc-old-", dir=target.parent))
        os.rename(target, aside / "old")
        os.rename(staging, target)
        _remove(aside)
    _fsync_dir(target.parent)
