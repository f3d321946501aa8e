"""ABQ-LLM on SmolLM2-135M: WikiText-2 perplexity of rtn, smoothquant+rtn, gptq and abq.

    python bench/abq.py                                        # the full table + ablation (hours)
    python bench/abq.py --configs W4A4 --methods rtn,smoothquant,abq --no-ablation \\
        --preset cpu --nsamples 32 --max-windows 8             # one cheap slice
    python bench/abq.py --resume                               # skip entries already in --out

Settings W6A6, W4A8, W4A4, W2*A16, W2*A8 (2* = bit balance: 5 symmetric levels, stored
as 3 bits); activations per token, dynamic, asymmetric. gptq quantizes weights (its
activations are RTN). Ablation at W4A4: abq without DLC (MSE terms only), without AKL,
without compensation; and W2A8 abq (no bit balance) beside W2*A8.
Calibration: the default corpus (pydoc), --nsamples x --calib-seqlen tokens; evaluation:
WikiText-2 test, --seqlen, first --max-windows windows. Each entry runs in its own
subprocess; results are rewritten after every entry to --out (bench/results/abq.json).
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

CONFIGS = ("W6A6", "W4A8", "W4A4", "W2*A16", "W2*A8")
METHODS = ("rtn", "smoothquant", "gptq", "abq")
#: ablation entry -> (config, abq_options changes)
ABLATION = {"abq-no-dlc": ("W4A4", {"dlc": False}), "abq-no-akl": ("W4A4", {"akl": False}),
            "abq-no-comp": ("W4A4", {"compensation": False}), "abq-no-bitbalance": ("W2A8", {})}
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_config(name: str) -> tuple[int | str, int]:
    """"W2*A8" -> ("2*", 8); "W4A4" -> (4, 4)."""
    w, a = name.upper()[1:].split("A", 1)
    return (w if w.endswith("*") else int(w)), int(a)


def compile_options(method: str, preset: str) -> dict:
    if method == "rtn":
        return {"method": "rtn"}
    if method == "smoothquant":
        return {"method": "rtn", "smooth": True}
    if method == "gptq":
        return {"method": "gptq"}
    if method == "abq":
        return {"method": "abq", "abq_options": {"preset": preset}}
    if method in ABLATION:
        return {"method": "abq", "abq_options": {"preset": preset, **ABLATION[method][1]}}
    raise SystemExit(f"unknown method {method!r}; use one of {list(METHODS) + list(ABLATION)}")


def run_one(args) -> dict:
    """Compile (calibrate) one entry and evaluate it; runs inside the child process."""
    import abqc
    from abqc.facts import CalibrationStats, facts
    import abqc.eval
    from frontends import corpus, hf

    model, tok = hf.load(args.model)
    windows = corpus.eval_windows(tok, corpus.load_text("wikitext2"), args.seqlen, args.max_windows)
    if args.one == "FP32":
        return {"config": "FP32", "method": "fp32",
                **abqc.eval.perplexity_of_windows(model, windows, desc="FP32")}
    name, method = args.one.split(":")
    wbits, abits = parse_config(name)
    options = compile_options(method, args.preset)
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    cm = abqc.compile(model, wbits=wbits, abits=abits, tokenizer=tok, nsamples=args.nsamples,
                      seqlen=args.calib_seqlen, tune=False, **options)  # time calibration, not tuning
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    compile_s = time.perf_counter() - t0
    r = abqc.eval.perplexity_of_windows(cm, windows, desc=args.one)
    abq_stats = (lambda f: f.blocks if f else {})(facts(cm.graph_module).get(CalibrationStats))
    r.update(config=name, wbits=wbits, abits=abits, method=method, options=options,
             compile_seconds=round(compile_s, 1),
             compile_cpu_seconds=round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 1),
             peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    if abq_stats:
        r["abq_block_loss"] = {str(b): {k: round(v, 6) for k, v in s.items()
                                        if k in ("loss_rtn", "loss_init", "loss_final")}
                               for b, s in abq_stats.items()}
        r["blocks_below_rtn"] = sum(s["loss_final"] < s["loss_rtn"] for s in abq_stats.values())
    return r


def table(results: list[dict]) -> str:
    """Perplexity table: configs as rows, methods as columns (ablation rows below)."""
    ppl = {(r["config"], r["method"]): r["ppl"] for r in results}
    cols = [m for m in METHODS if any(k[1] == m for k in ppl)]
    lines = ["| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for c in CONFIGS:
        if any((c, m) in ppl for m in cols):
            lines.append(f"| {c} | " + " | ".join(f"{ppl[(c, m)]:.2f}" if (c, m) in ppl else "-"
                                                   for m in cols) + " |")
    for m, (c, _) in ABLATION.items():
        if (c, m) in ppl:
            lines.append(f"| {c} {m} | {ppl[(c, m)]:.2f} |")
    if ("FP32", "fp32") in ppl:
        lines.append(f"| FP32 | {ppl[('FP32', 'fp32')]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-ablation", action="store_true", help="skip the W4A4 / W2A8 ablation")
    ap.add_argument("--preset", default="reference", choices=("reference", "cpu"),
                    help="ABQ training preset (cpu: 2 epochs)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "abq.json"))
    ap.add_argument("--resume", action="store_true", help="keep and skip entries already in --out")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import logging
        logging.basicConfig(level=logging.INFO, format="[abqc] %(message)s")
        write_json(args.child_out, run_one(args))
        return

    entries = ["FP32"] + [f"{c}:{m}" for c in args.configs.split(",") for m in args.methods.split(",")]
    if not args.no_ablation:
        entries += [f"{c}:{m}" for m, (c, _) in ABLATION.items()]
    report = {"benchmark": "abq", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
              "model": "SmolLM2-135M-Instruct (FP32 = dequantized GGUF Q4_1)",
              "calibration": f"pydoc, {args.nsamples} x {args.calib_seqlen} tokens, seed 0; "
                             f"abq preset {args.preset}",
              "evaluation": f"wikitext2 test, seqlen {args.seqlen}, first {args.max_windows} windows",
              "results": []}
    if args.resume and os.path.exists(args.out):
        report["results"] = json.load(open(args.out))["results"]
    done = {"FP32" if r["config"] == "FP32" else f"{r['config']}:{r['method']}" for r in report["results"]}
    for entry in entries:
        if entry in done:
            continue
        child_out = args.out + ".child.json"
        cmd = [sys.executable, __file__, "--one", entry, "--child-out", child_out] + \
              [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
               if k in ("model", "nsamples", "calib_seqlen", "seqlen", "max_windows", "preset")]
        subprocess.run(cmd, check=True)
        r = json.load(open(child_out))
        os.remove(child_out)
        fp = next((x for x in report["results"] if x["config"] == "FP32"), None)
        if fp and entry != "FP32":
            r["ppl_ratio_vs_fp32"] = r["ppl"] / fp["ppl"]
        report["results"].append(r)
        report["table"] = table(report["results"])
        write_json(args.out, report)
        print(f"{entry}: ppl {r['ppl']:.3f}" + (f", compile {r['compile_seconds']}s"
                                                 if entry != "FP32" else ""), flush=True)
    print(table(report["results"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
