"""Rotation on/off (the ablation of the low-bit-quality issue): SmolLM2-135M, WikiText-2.

    python bench/rotation.py                                  # rtn at W4A8, W4A4; 4 windows
    python bench/rotation.py --methods rtn,gptq --windows 32   # the table protocol

Every row is compiled with and without ``rotate="hadamard"`` in the same run, beside FP32;
calibration (gptq, quantease, abq) uses the pydoc corpus, never WikiText. Perplexity by the
protocol of ../shared/data/wikitext-2-raw (seqlen 2048, first N windows), on the kernels.
Results: bench/results/rotation.json, rewritten after every row.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import abqc  # noqa: E402
import abqc.eval  # noqa: E402
from abqc.atomic import write_json  # noqa: E402
from frontends import corpus, hf  # noqa: E402
from machine import machine_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rtn")
    ap.add_argument("--schemes", default="W4A8,W4A4")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rotation.json"))
    args = ap.parse_args()
    model, tok = hf.load("default")
    windows = corpus.eval_windows(tok, corpus.load_text("wikitext2"), 2048, args.windows)
    res = {"benchmark": "rotation", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(), "command": " ".join(sys.argv),
           "protocol": f"WikiText-2 test, seqlen 2048, first {args.windows} windows",
           "calibration": f"pydoc corpus, {args.nsamples} x 512 tokens (data-driven methods)",
           "fp32": abqc.eval.perplexity_of_windows(model, windows, progress=False)["ppl"], "rows": {}}
    print("FP32", round(res["fp32"], 3), flush=True)
    for method in args.methods.split(","):
        for scheme in args.schemes.split(","):
            w, a = scheme[1:].split("A")
            for rotate in (None, "hadamard"):
                t = time.perf_counter()
                kw = dict(method=method, tokenizer=tok, nsamples=args.nsamples, rotate=rotate)
                if method == "abq":
                    kw["abq_options"] = {"preset": "cpu"}
                cm = abqc.compile(model, wbits=w if w == "2*" else int(w), abits=int(a), **kw)
                ppl = abqc.eval.perplexity_of_windows(cm, windows, progress=False)["ppl"]
                name = f"{scheme} {method}" + (" + rotate" if rotate else "")
                res["rows"][name] = {"ppl": ppl, "x_fp32": round(ppl / res["fp32"], 4),
                                     "seconds": round(time.perf_counter() - t, 1)}
                print(name, res["rows"][name], flush=True)
                write_json(args.out, res)


if __name__ == "__main__":
    main()
