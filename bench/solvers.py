"""Layer-wise solvers on SmolLM2-135M: WikiText-2 perplexity and calibration cost per method.

    python bench/solvers.py                                   # the full grid (hours on 2 cores)
    python bench/solvers.py --configs W3A16 --group-sizes 0   # one slice
    python bench/solvers.py --resume                          # skip entries already in --out
    python bench/solvers.py --calib-device cuda --eval-device cuda --jobs 4   # on a GPU machine

Calibration: the default corpus (pydoc), --nsamples x --calib-seqlen tokens; evaluation:
WikiText-2 test, --seqlen 2048, first --max-windows 32 windows. Each entry runs in its own
subprocess so its peak resident memory is its own; the FP32 model is evaluated in the
same invocation and every entry carries its ratio to it. Results are rewritten after
every entry to --out (default bench/results/solvers.json). With --jobs N, N entries run at
once (each child gets cores/N threads): their calibration times are then not comparable
to a run of one job at a time, and the JSON says so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from abqc.atomic import write_json  # noqa: E402
from machine import machine_info  # noqa: E402

CONFIGS = {"W4A16": 4, "W3A16": 3}
METHODS = ("rtn", "gptq", "quantease", "quantease_outlier", "gptq_quantease")
HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(args) -> dict:
    """Compile (calibrate) one entry and evaluate it; runs inside the child process."""
    import abqc
    import abqc.eval
    from frontends import corpus, hf

    import torch

    model, tok = hf.load(args.model)
    windows = corpus.eval_windows(tok, corpus.load_text("wikitext2"), args.seqlen, args.max_windows)
    windows = windows.to(args.eval_device)
    if args.one == "FP32":
        with torch.no_grad():
            r = abqc.eval.perplexity_of_windows(model.to(args.eval_device), windows, desc="FP32")
        return {"config": "FP32", "method": "fp32", **r}
    name, gs, method = args.one.split(":")
    solver_options = json.loads(args.solver_options)
    if method == "quantease_outlier":
        solver_options.setdefault("outlier_fraction", 0.01)
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    cm = abqc.compile(model, wbits=CONFIGS[name], abits=16, method=method, group_size=int(gs),
                      tokenizer=tok, backend="fake_quant", nsamples=args.nsamples,
                      seqlen=args.calib_seqlen, calib_corpus=args.calib,
                      calib_device=args.calib_device, solver_options=solver_options)
    compile_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    compile_cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    peak_calib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    calib_s = sum(dt for _, n, dt in cm.pass_timings if n == "Calibrate")
    stats = cm.calibration_stats
    peak_gpu = (torch.cuda.max_memory_allocated() / 2**20 if args.calib_device != "cpu" else None)
    with torch.no_grad():
        r = abqc.eval.perplexity_of_windows(cm.to(args.eval_device), windows, desc=args.one)
    r.update(config=name, wbits=CONFIGS[name], abits=16, group_size=int(gs), method=method,
             solver_options=solver_options, compile_seconds=round(compile_s, 1),
             compile_cpu_seconds=round(compile_cpu_s, 1),
             calibration_seconds=round(calib_s, 1), peak_rss_mb_calibration=round(peak_calib),
             calib_device=args.calib_device, eval_device=args.eval_device,
             peak_gpu_mb_calibration=None if peak_gpu is None else round(peak_gpu),
             mean_rel_error=(sum(s["rel_error"] for s in stats.values()) / len(stats)) if stats else None,
             notes=sorted({n for s in stats.values() for n in s["notes"] if "outliers" not in n}))
    return r


def _add_ratios(results: list[dict]) -> None:
    """Every entry's perplexity over FP32's (once FP32 is there: jobs may finish in any order)."""
    fp = next((x for x in results if x["config"] == "FP32"), None)
    for r in results:
        if fp and r["config"] != "FP32":
            r["ppl_ratio_vs_fp32"] = r["ppl"] / fp["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", default="W3A16,W4A16")
    ap.add_argument("--group-sizes", default="0,128")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--solver-options", default="{}", help="JSON, e.g. '{\"sweeps\": 20}'")
    ap.add_argument("--calib", default="pydoc", help="calibration corpus: pydoc or a text file")
    ap.add_argument("--calib-device", default="cpu", help="where the solvers run: cpu or cuda")
    ap.add_argument("--eval-device", default="cpu", help="where perplexity is computed: cpu or cuda")
    ap.add_argument("--jobs", type=int, default=1, help="entries run at once (default 1)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "solvers.json"))
    ap.add_argument("--resume", action="store_true", help="keep and skip entries already in --out")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import logging
        logging.basicConfig(level=logging.INFO, format="[abqc] %(message)s")
        write_json(args.child_out, run_one(args))
        return

    entries = ["FP32"] + [f"{c}:{g}:{m}" for c in args.configs.split(",")
                          for g in args.group_sizes.split(",") for m in args.methods.split(",")]
    calib = "pydoc" if args.calib == "pydoc" else f"text file {os.path.basename(args.calib)}"
    report = {"benchmark": "solvers", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
              "model": "SmolLM2-135M-Instruct (FP32 = dequantized GGUF Q4_1)",
              "calibration": f"{calib}, {args.nsamples} x {args.calib_seqlen} tokens, seed 0, "
                             f"on {args.calib_device}",
              "evaluation": f"wikitext2 test, seqlen {args.seqlen}, first {args.max_windows} windows, "
                            f"on {args.eval_device}",
              "jobs": args.jobs, "results": []}
    if args.calib_device != "cpu" or args.eval_device != "cpu":
        import torch

        report["machine"]["gpu"] = torch.cuda.get_device_name()
    if args.resume and os.path.exists(args.out):
        report["results"] = json.load(open(args.out))["results"]
    done = {"FP32" if r["config"] == "FP32" else f"{r['config']}:{r['group_size']}:{r['method']}"
            for r in report["results"]}
    todo = [e for e in entries if e not in done]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    running: dict[str, tuple[subprocess.Popen, str]] = {}
    failed = []
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            entry = todo.pop(0)
            child_out = f"{args.out}.{entry.replace(':', '_')}.child.json"
            cmd = [sys.executable, __file__, "--one", entry, "--child-out", child_out] + \
                  [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("model", "nsamples", "calib_seqlen", "seqlen", "max_windows",
                            "solver_options", "calib", "calib_device", "eval_device")]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if args.jobs > 1 else None
            running[entry] = (subprocess.Popen(cmd, env=env), child_out)
        time.sleep(0.5)
        for entry, (proc, child_out) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[entry]
            if proc.returncode != 0:
                failed.append(entry)
                print(f"{entry}: FAILED (exit {proc.returncode})", flush=True)
                continue
            r = json.load(open(child_out))
            os.remove(child_out)
            report["results"].append(r)
            _add_ratios(report["results"])
            write_json(args.out, report)
            print(f"{entry}: ppl {r['ppl']:.3f}" + (f", calibration {r['calibration_seconds']}s, peak "
                  f"{r['peak_rss_mb_calibration']} MB" if entry != "FP32" else ""), flush=True)
    if failed:
        raise SystemExit(f"failed entries: {failed}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
