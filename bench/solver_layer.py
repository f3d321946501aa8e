"""Relative error ||(W-Ŵ)X||²/||WX||² of every solver on the synthetic layer, 3-bit per row.

    python bench/solver_layer.py        # -> bench/results/solver_layer.json

Each method is compared with RTN on the same layer (ratio).
"""
from __future__ import annotations

import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from abqc.atomic import write_json  # noqa: E402
from abqc.config import QuantSpec  # noqa: E402
from abqc.solvers import SOLVERS, solve  # noqa: E402
from abqc.solvers.synthetic import synthetic_layer  # noqa: E402
from machine import machine_info  # noqa: E402


def main() -> None:
    n, k = 256, 384
    w, sigma = synthetic_layer(n, k, t=4096)
    spec = QuantSpec(bits=3)
    rows = []
    for method in SOLVERS:
        r = solve(method, w, sigma, spec)
        rows.append({"method": method, "rel_error": r.stats["rel_error"], "seconds": round(r.stats["seconds"], 3),
                     "notes": r.stats["notes"]})
    rtn = next(r["rel_error"] for r in rows if r["method"] == "rtn")
    for r in rows:
        r["ratio_vs_rtn"] = r["rel_error"] / rtn
        print(f"{r['method']:<18} rel.err {r['rel_error']:.5f}  x{r['ratio_vs_rtn']:.3f} of RTN  {r['seconds']}s")
    out = os.path.join(os.path.dirname(__file__), "results", "solver_layer.json")
    write_json(out, {"benchmark": "solver_layer", "command": "python bench/solver_layer.py",
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "machine": machine_info(), "layer": f"synthetic n={n} k={k}, 4 outlier channels, 3-bit per row",
                     "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
