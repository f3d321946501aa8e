"""CPU kernels against torch: GEMV/GEMM per shape and bit width, plus the machine's ceilings.

    python bench/kernels.py                                   # the issue's grid, M=1 (hours: use --quick)
    python bench/kernels.py --quick --m 1,16                  # a reduced search space
    python bench/kernels.py --quick --m 1,16,128 --resume     # only what --out lacks
    python bench/kernels.py --shapes 4096x4096 --bits W2A8,W4A4 --m 1

For each shape NxK and M: torch fp32 ``F.linear`` and torch's fbgemm int8 dynamic linear
(``quantize_dynamic``) on the same input, each timed in its own process; for each WxAy the
abqc kernel is tuned (formulation and schedule, ``abqc.codegen.tuning``) in its own process
and its best time kept. Micro-benchmarks measure memory bandwidth (a large copy), popcount
throughput and 16-entry table-lookup throughput with TVM kernels; each kernel is reported
as a fraction of its memory roofline (packed weight bytes / bandwidth). Threads: torch and
TVM both use --threads. Results: bench/results/kernels.json (rewritten after each entry).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from abqc.atomic import write_json  # noqa: E402
from machine import machine_info  # noqa: E402

SHAPES = "576x576,576x1536,1536x576,4096x4096,4096x11008,11008x4096"
BITS = "W1A1,W2A2,W2A8,W3A8,W4A4,W4A8,W6A6,W8A8,W4A16,W2*A16"
HERE = os.path.dirname(os.path.abspath(__file__))


def _bits(spec: str) -> tuple[int, int, int]:
    """'W2*A16' -> (3 stored bits, 16, 4 = qmax of the 5-level grid); 'W4A8' -> (4, 8, 15)."""
    w, a = spec[1:].split("A")
    if w.endswith("*"):
        return 3, int(a), 4
    return int(w), int(a), (1 << int(w)) - 1


def _timeit(fn, min_s: float = 0.3) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    times = []
    while time.perf_counter() - t0 < min_s or n < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        n += 1
    return statistics.median(times) * 1e3


def child_torch(n: int, k: int, m: int) -> dict:
    import torch

    x = torch.randn(m, k)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        fp32 = _timeit(lambda: torch.nn.functional.linear(x, lin.weight))
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                   dtype=torch.qint8)
        fbgemm = _timeit(lambda: q(x))
    return {"fp32_ms": fp32, "fbgemm_int8_ms": fbgemm}


def child_abqc(n: int, k: int, bits: str, ms: list[int], quick: bool,
               formulations: list[str] | None = None, extra: dict | None = None) -> list[dict]:
    """Tune (shape, bits) per M; `formulations` limits the space (``vnni_gemm``: the
    register-blocked vnni schedules only), `extra` adds schedules per M (an earlier winner)."""
    from abqc.codegen.compute import KernelShape
    from abqc.codegen.tuning import TuningLog, candidates, tune

    wbits, abits, _ = _bits(bits)
    shape = KernelShape(n, k, wbits, abits)
    log = TuningLog(os.path.join(tempfile.mkdtemp(prefix="abqc-kb-"), "kernels.jsonl"))
    out = []
    for m in ms:
        space = candidates(shape, m)
        if quick:  # unpack's and vnni's schedules, one tile size of bitserial and lut
            space = [(f, p) for f, p in space if f in ("unpack", "vnni") or p.get("n_tile") == 16]
        if formulations:
            space = [(f, p) for f, p in space if f in formulations
                     or ("vnni_gemm" in formulations and f == "vnni" and p.get("m_tile", 1) > 1)]
        space += [tuple(e) for e in (extra or {}).get(str(m), []) if tuple(e) not in space]
        rec = tune(shape, m, log, space=space)
        out.append({"m": m, "ms": rec["ms"], "formulation": rec["formulation"],
                    "params": rec["params"], "candidates": len(rec["candidates"]),
                    "tuning_s": rec["tuning_seconds"],
                    "best_per_formulation": {
                        f: min(c["ms"] for c in rec["candidates"] if c["formulation"] == f)
                        for f in {c["formulation"] for c in rec["candidates"]}}})
    return out


def _merge(old: dict, new: dict) -> dict:
    """A row re-run on part of the space (with the old winner measured again beside it): the
    new times replace the old ones per formulation; the winner is the fastest of all."""
    best = {**old.get("best_per_formulation", {}), **new["best_per_formulation"]}
    won = new if new["ms"] <= min(best.values()) else old
    return {"m": new["m"], "ms": min(best.values()), "formulation": won["formulation"],
            "params": won.get("params"), "candidates": old.get("candidates", 0) + new["candidates"],
            "tuning_s": round(old.get("tuning_s", 0) + new["tuning_s"], 2),
            "best_per_formulation": best,
            "updated": {"earlier_ms": old["ms"], "earlier_params": old.get("params"),
                        "rerun": new["best_per_formulation"], "rerun_params": new["params"]}}


def child_micro() -> dict:
    """Memory bandwidth, popcount and table-lookup throughput on this machine."""
    import numpy as np
    import torch
    import tvm
    from tvm import te, tirx

    from abqc.codegen.build import host_target

    a = torch.randn(64 * 2 ** 20)  # 256 MiB
    b = torch.empty_like(a)
    copy_ms = _timeit(lambda: b.copy_(a), 1.0)
    bw = 2 * a.numel() * 4 / (copy_ms / 1e3) / 1e9  # read + write

    words = 4 * 2 ** 20  # 32 MiB of int64: popcount every word (vectorised by LLVM)
    w = te.placeholder((words,), "int64", name="w")
    r = te.reduce_axis((0, words // 8), "r")
    pc = te.compute((8,), lambda i: te.sum(tirx.popcount(w[r * 8 + i]).astype("int32"), axis=r))
    ex = tvm.compile(te.create_prim_func([w, pc]), target=host_target())
    wt = tvm.runtime.tensor(np.random.randint(-2 ** 62, 2 ** 62, words, dtype=np.int64))
    ot = tvm.runtime.tensor(np.zeros(8, dtype=np.int32))
    f = ex.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=5)
    pop_ms = float(np.median(f(wt, ot).results)) * 1e3

    count = 32 * 2 ** 20  # 16-entry int16 table, one lookup per uint8 index
    idx = te.placeholder((count,), "uint8", name="idx")
    tab = te.placeholder((16,), "int16", name="tab")
    r2 = te.reduce_axis((0, count // 8), "r2")
    lk = te.compute((8,), lambda i: te.sum(tab[idx[r2 * 8 + i] & tirx.const(15, "uint8")]
                                           .astype("int32"), axis=r2))
    ex2 = tvm.compile(te.create_prim_func([idx, tab, lk]), target=host_target())
    it = tvm.runtime.tensor(np.random.randint(0, 16, count, dtype=np.uint8))
    tt = tvm.runtime.tensor(np.arange(16, dtype=np.int16))
    ot2 = tvm.runtime.tensor(np.zeros(8, dtype=np.int32))
    f2 = ex2.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=5)
    lk_ms = float(np.median(f2(it, tt, ot2).results)) * 1e3
    return {"bandwidth_gb_s": round(bw, 2), "popcount64_g_per_s": round(words / (pop_ms / 1e3) / 1e9, 3),
            "lookup16_g_per_s": round(count / (lk_ms / 1e3) / 1e9, 3),
            "note": "single-threaded LLVM kernels for popcount/lookup (no parallel loop); copy uses torch's threads"}


def run_child(kind: str, payload: dict, env: dict):
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tf:
        out = tf.name
    subprocess.run([sys.executable, __file__, "--child", json.dumps({"kind": kind, **payload}),
                    "--child-out", out], check=True, env=env)
    with open(out) as f:
        r = json.load(f)
    os.remove(out)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--bits", default=BITS)
    ap.add_argument("--m", default="1")
    ap.add_argument("--quick", action="store_true", help="reduced search space")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernels.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the entries already in --out and run only the missing ones (each "
                         "row carries the baselines measured beside it)")
    ap.add_argument("--formulations", default=None,
                    help="tune only these (comma-separated; vnni_gemm = the register-blocked vnni "
                         "schedules)")
    ap.add_argument("--update", action="store_true",
                    help="with --formulations: re-run rows already in --out against the row's "
                         "earlier winner, measured again in this run, and merge the times")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        job = json.loads(args.child)
        kind = job.pop("kind")
        res = {"torch": lambda: child_torch(**job), "abqc": lambda: child_abqc(**job),
               "micro": child_micro}[kind]()
        write_json(args.child_out, res)
        return
    env = dict(os.environ, TVM_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    ms = [int(v) for v in args.m.split(",")]
    report = {"benchmark": "kernels", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {**machine_info(), "threads": args.threads}, "quick": args.quick,
              "micro": run_child("micro", {}, env), "baselines": [], "results": []}
    print(json.dumps(report["micro"]), flush=True)
    bw = report["micro"]["bandwidth_gb_s"]
    done: set = set()
    if args.update and not args.formulations:
        ap.error("--update needs --formulations (what to re-run)")
    forms = args.formulations.split(",") if args.formulations else None
    if (args.resume or args.update) and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        report["results"], report["baselines"] = old["results"], old["baselines"]
        report["commands"] = old.get("commands", [old["command"]]) + [report["command"]]
        done = set() if args.update else {(r["n"], r["k"], r["bits"], r["m"]) for r in report["results"]}
        first = {}
        for b in report["baselines"]:  # older rows: the baseline of their own run
            first.setdefault((b["n"], b["k"], b["m"]), b)
        for r in report["results"]:
            b = first.get((r["n"], r["k"], r["m"]))
            if b and "baseline_fp32_ms" not in r:
                r["baseline_fp32_ms"], r["baseline_fbgemm_int8_ms"] = b["fp32_ms"], b["fbgemm_int8_ms"]
    for shp in args.shapes.split(","):
        n, k = (int(v) for v in shp.split("x"))
        todo = {b: [m for m in ms if (n, k, b, m) not in done] for b in args.bits.split(",")}
        todo = {b: v for b, v in todo.items() if v}
        if not todo:
            continue
        base = {}
        for m in sorted({m for v in todo.values() for m in v}):
            base[m] = run_child("torch", {"n": n, "k": k, "m": m}, env)
            report["baselines"].append({"n": n, "k": k, "m": m, **base[m]})
        for bits, bms in todo.items():
            wbits, abits, _ = _bits(bits)
            earlier = {r["m"]: r for r in report["results"]
                       if (r["n"], r["k"], r["bits"]) == (n, k, bits) and r["m"] in bms}
            if args.update and not earlier:
                continue
            job = {"n": n, "k": k, "bits": bits, "ms": bms, "quick": args.quick, "formulations": forms,
                   "extra": {str(m): [[r["formulation"], r["params"]]] for m, r in earlier.items()
                             if args.update and "params" in r}}
            rows = run_child("abqc", job, env)
            for r in rows:
                if args.update and r["m"] in earlier:
                    r = _merge(earlier[r["m"]], r)
                    report["results"].remove(earlier[r["m"]])
                wbytes = n * k * wbits / 8
                roof_ms = wbytes / (bw * 1e9) * 1e3
                row = {"n": n, "k": k, "bits": bits, **r,
                       "speedup_vs_fp32": round(base[r["m"]]["fp32_ms"] / r["ms"], 3),
                       "speedup_vs_fbgemm_int8": round(base[r["m"]]["fbgemm_int8_ms"] / r["ms"], 3),
                       "baseline_fp32_ms": base[r["m"]]["fp32_ms"],
                       "baseline_fbgemm_int8_ms": base[r["m"]]["fbgemm_int8_ms"],
                       "weight_mb": round(wbytes / 2 ** 20, 3),
                       "memory_roofline_fraction": round(roof_ms / r["ms"], 3)}
                report["results"].append(row)
                print(json.dumps({k2: row[k2] for k2 in ("n", "k", "bits", "m", "ms", "formulation",
                                                         "speedup_vs_fp32", "speedup_vs_fbgemm_int8")}),
                      flush=True)
            write_json(args.out, report)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
