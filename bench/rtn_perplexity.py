"""WikiText-2 perplexity of SmolLM2-135M: FP32 (dequantized GGUF) and RTN at several widths.

    python bench/rtn_perplexity.py                      # seqlen 2048, first 32 windows
    python bench/rtn_perplexity.py --max-windows 4      # quicker

Each quantized result is compared with the FP32 run of the same invocation (ratio).
Results go to bench/results/rtn_perplexity.json, rewritten after every configuration.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import abqc  # noqa: E402
import abqc.eval  # noqa: E402
from abqc.atomic import write_json  # noqa: E402
from frontends import corpus, hf  # noqa: E402
from machine import machine_info  # noqa: E402

CONFIGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A16": (4, 16), "W4A8": (4, 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rtn_perplexity.json"))
    args = ap.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {list(CONFIGS)}")

    model, tok = hf.load(args.model)
    windows = corpus.eval_windows(tok, corpus.load_text("wikitext2"), args.seqlen, args.max_windows)
    report = {"benchmark": "rtn_perplexity", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
              "model": "SmolLM2-135M-Instruct (FP32 = dequantized GGUF Q4_1)" if args.model == "default" else args.model,
              "data": "wikitext2 test", "seqlen": args.seqlen, "windows": len(windows),
              "group_size": args.group_size, "results": []}

    fp = abqc.eval.perplexity_of_windows(model, windows, desc="FP32")
    report["results"].append({"config": "FP32", "wbits": None, "abits": None, **fp})
    write_json(args.out, report)
    for name in names:
        wbits, abits = CONFIGS[name]
        t0 = time.perf_counter()
        cm = abqc.compile(model, wbits=wbits, abits=abits, method="rtn", group_size=args.group_size,
                          backend="fake_quant")
        compile_s = time.perf_counter() - t0
        r = abqc.eval.perplexity_of_windows(cm, windows, desc=f"RTN {name}")
        r.update(config=name, wbits=wbits, abits=abits, method="rtn", compile_seconds=round(compile_s, 1),
                 ppl_ratio_vs_fp32=r["ppl"] / fp["ppl"])
        report["results"].append(r)
        write_json(args.out, report)
        print(f"{name}: ppl {r['ppl']:.3f} (x{r['ppl_ratio_vs_fp32']:.4f} of FP32 {fp['ppl']:.3f})", flush=True)
        del cm
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
