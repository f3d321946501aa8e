"""The JSON-lines tuning log shared by the CPU and CUDA tuners (torch- and TVM-free).

One record per key (``cpu|m..|n..`` or ``cuda-sm90|m..|n..``): the chosen formulation and
schedule, its time, every candidate tried; ``abqc tune --show`` prints it as a table.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..atomic import write_text
from ..cache import cache_dir

log = logging.getLogger("abqc")


class TuningLog:
    """The JSON-lines tuning log: read once, appended atomically (rewrite to temp + rename)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else cache_dir("tuning") / "kernels.jsonl"
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        self.records[rec["key"]] = rec
                    except (json.JSONDecodeError, KeyError):
                        log.warning("tuning log %s line %d is not a record; ignored", self.path, i + 1)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records.values()))

    def table(self) -> str:
        """The log as an aligned text table (``abqc tune --show``)."""
        rows = [("key", "formulation", "schedule", "ms", "tried", "date")]
        for r in self.records.values():
            p = r["params"]
            sched = (f"{p['order']} n{p['n_tile']}{'' if p.get('m_outer', True) else ' m-in'}"
                     if "order" in p else " ".join(f"{k}{v}" for k, v in p.items()))  # CUDA records
            rows.append((r["key"], r["formulation"], sched,
                         f"{r['ms']:.4f}", str(len(r.get("candidates", []))), r["date"][:16]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
