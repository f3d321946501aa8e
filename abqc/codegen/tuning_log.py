"""The JSON-lines tuning log shared by the CPU and CUDA tuners (torch- and TVM-free).

One record per key (``cpu|m..|n..`` or ``cuda-sm90|m..|n..``): the chosen formulation and
schedule, its time, every candidate tried; ``abqc tune --show`` prints it as a table.

The file is append-only: `TuningLog.add` appends one line under an exclusive lock of
``<log>.lock`` (``flock``), so processes tuning at once lose no record; the last record of
a key wins, and no line is ever rewritten (a tuning takes minutes; the file stays small).
Readers take only complete lines and pick up what other processes appended.
Lines that are not a sane record (not UTF-8, not JSON, ``n_tile=0``, ``ms=0``, negative
tiles, unknown value types) are skipped with a warning naming the file and line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from ..cache import cache_dir
from ..errors import ConfigError

log = logging.getLogger("abqc")

_WORD = re.compile(r"[A-Za-z0-9_]{1,64}")


def check_record(rec: Any) -> str | None:
    """Why `rec` is not a sane tuning record, or None."""
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not a record"
    key = rec.get("key")
    if not isinstance(key, str) or not key or len(key) > 512:
        return f"key={key!r} is not a tuning key"
    why = _check_choice(rec, "")
    if why:
        return why
    cands = rec.get("candidates", [])
    if not isinstance(cands, list):
        return f"candidates={cands!r} is not a list"
    for i, c in enumerate(cands):
        why = _check_choice(c, f"candidates[{i}].") if isinstance(c, dict) else \
            f"candidates[{i}]={c!r} is not a table"
        if why:
            return why
    if not isinstance(rec.get("date", ""), str):
        return f"date={rec.get('date')!r} is not a string"
    return None


def _check_choice(rec: dict, where: str) -> str | None:
    """A formulation, its schedule params and its time (a record, or one of its candidates)."""
    if not isinstance(rec.get("formulation"), str) or not _WORD.fullmatch(rec["formulation"]):
        return f"{where}formulation={rec.get('formulation')!r} is not a formulation name"
    params = rec.get("params")
    if not isinstance(params, dict):
        return f"{where}params={params!r} is not a table"
    for k, v in params.items():
        if not isinstance(k, str) or not _WORD.fullmatch(k):
            return f"{where}params has a key {k!r}"
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not 1 <= v <= 1 << 16:
                return f"{where}params.{k}={v!r} is not a positive size (1..65536)"
        elif not (isinstance(v, str) and _WORD.fullmatch(v)):
            return f"{where}params.{k}={v!r} is not a size, a flag or a name"
    ms = rec.get("ms")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
        return f"{where}ms={ms!r} is not a positive time"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock of ``<path>.lock`` (a no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        yield
        return
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing releases the lock)


class TuningLog:
    """The JSON-lines tuning log: append-only, locked, re-read when another process adds."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else cache_dir("tuning") / "kernels.jsonl"
        self.records: dict[str, dict] = {}
        self._ident = None  # (device, inode) of the file read so far
        self._offset = 0  # bytes of it consumed (whole lines)
        self._lines = 0
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("tuning log %s cannot be read (%s); ignored", self.path, e)
            return
        ident = (st.st_dev, st.st_ino)
        if ident != self._ident or st.st_size < self._offset:  # compacted or replaced
            self.records, self._offset, self._lines, self._ident = {}, 0, 0, ident
        if st.st_size == self._offset:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
        except OSError as e:
            log.warning("tuning log %s cannot be read (%s); ignored", self.path, e)
            return
        end = data.rfind(b"\n") + 1  # whole lines only: a writer may be mid-line
        for raw in data[:end].split(b"\n")[:-1]:
            self._lines += 1
            self._parse(raw, self._lines)
        self._offset += end

    def _parse(self, raw: bytes, lineno: int) -> None:
        if not raw.strip():
            return
        try:
            rec = json.loads(raw.decode("utf-8"))
            why = check_record(rec)
        except UnicodeDecodeError:
            why = "not UTF-8 text"
        except (json.JSONDecodeError, RecursionError) as e:
            why = f"not JSON ({e.__class__.__name__})"
        if why is None:
            self.records[rec["key"]] = rec
        else:
            log.warning("tuning log %s line %d is not a valid record (%s); skipped",
                        self.path, lineno, why)

    def get(self, key: str) -> dict | None:
        self._refresh()
        return self.records.get(key)

    def add(self, record: dict) -> None:
        """Append `record` (one line, under the lock); the newest record of a key wins."""
        why = check_record(record)
        if why is not None:
            raise ConfigError(f"tuning record for {record.get('key') if isinstance(record, dict) else record!r}"
                              f" is not valid: {why}")
        line = (json.dumps(record) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            with open(self.path, "ab+") as f:
                if f.tell():  # a writer killed mid-line must not swallow this record
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._refresh()  # (every line up to ours: the newest record of the key is ours)

    def table(self) -> str:
        """The log as an aligned text table (``abqc tune --show``)."""
        rows = [("key", "formulation", "schedule", "ms", "tried", "date")]
        for r in self.records.values():
            p = r["params"]
            sched = (f"{p['order']} n{p.get('n_tile')}{'' if p.get('m_outer', True) else ' m-in'}"
                     if "order" in p else " ".join(f"{k}{v}" for k, v in p.items()))  # CUDA records
            rows.append((r["key"], r["formulation"], sched,
                         f"{r['ms']:.4f}", str(len(r.get("candidates", []))), r.get("date", "")[:16]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
