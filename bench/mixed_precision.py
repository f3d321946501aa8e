"""Mixed precision under a 3.0-bit budget against uniform W3, on SmolLM2-135M / WikiText-2.

    python bench/mixed_precision.py                          # RTN, seqlen 2048, 32 windows
    python bench/mixed_precision.py --method gptq --max-windows 8

Every entry uses the same calibration windows (default corpus, 16 x 512 tokens) and the
same weight method; only the widths differ. Widths are chosen by the loss-weighted
(diagonal Fisher) sensitivity, by the loss measured with one linear quantized at a time,
and, for comparison, by each layer's output error. The budget counts the 5-level "2*" grid as
log2(5) bits (its information), though it is stored in 3; a second mixed entry allows only
integer widths (2, 3, 4, 6, 8), so its average is also its storage. Both averages are
reported. Results go to bench/results/mixed_precision.json, rewritten after each entry.
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
from abqc.config import BIT_BALANCE, CompileConfig  # noqa: E402
from abqc.facts import BitWidths, facts
from abqc.passes.bitwidth import width_cost  # noqa: E402
from frontends import corpus, hf  # noqa: E402
from machine import machine_info  # noqa: E402

ENTRIES = {"uniform W3": {}}
for _sens in ("fisher", "loss"):
    for _name, _widths in (("{2*,3,4,6,8}", (BIT_BALANCE, 3, 4, 6, 8)), ("{2,3,4,6,8}", (2, 3, 4, 6, 8))):
        ENTRIES[f"mixed 3.0 {_name} {_sens}"] = {"bit_budget": 3.0, "bit_widths": _widths,
                                                 "bit_sensitivity": _sens}
ENTRIES["mixed 3.0 {2,3,4,6,8} output"] = {"bit_budget": 3.0, "bit_widths": (2, 3, 4, 6, 8),
                                           "bit_sensitivity": "output"}

def stored_bits(w) -> int:
    return 3 if w == BIT_BALANCE else int(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="rtn", help="weight method for every entry (rtn, gptq, ...)")
    ap.add_argument("--group-size", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mixed_precision.json"))
    args = ap.parse_args()

    model, tok = hf.load(args.model)
    cfg = CompileConfig(nsamples=args.nsamples, seqlen=args.calib_seqlen)
    calib = corpus.calibration_windows(tok, corpus.load_text(cfg.calib_corpus), cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = corpus.eval_windows(tok, corpus.load_text("wikitext2"), args.seqlen, args.max_windows)
    report = {"benchmark": "mixed_precision", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
              "model": "SmolLM2-135M-Instruct (FP32 = dequantized GGUF Q4_1)" if args.model == "default" else args.model,
              "calibration": f"{cfg.calib_corpus}, {cfg.nsamples} x {cfg.seqlen} tokens, seed {cfg.seed}",
              "evaluation": f"wikitext2 test, seqlen {args.seqlen}, first {len(windows)} windows",
              "method": args.method, "group_size": args.group_size, "abits": 16, "results": []}
    fp = abqc.eval.perplexity_of_windows(model, windows, desc="FP32")
    report["results"].append({"entry": "FP32", **fp})
    write_json(args.out, report)
    for name, opts in ENTRIES.items():
        t0 = time.perf_counter()
        cm = abqc.compile(model, wbits=3, abits=16, method=args.method, group_size=args.group_size,
                          calib=calib, backend="fake_quant", **opts)
        compile_s = time.perf_counter() - t0
        assign = (lambda f: f.report if f else None)(facts(cm.graph_module).get(BitWidths))
        # widths as the graph carries them (what the kernels get), not as the pass reported them
        widths = {p: (BIT_BALANCE if a.weight.balanced else a.weight.bits)
                  for p, a in cm.annotations.items() if a is not None}
        sizes = {p: model.get_submodule(p).weight.numel() for p in widths}
        total = sum(sizes.values())
        counts: dict[str, int] = {}
        for w in widths.values():
            counts[f"W{w}"] = counts.get(f"W{w}", 0) + 1
        r = abqc.eval.perplexity_of_windows(cm, windows, desc=name)
        r.update(entry=name, options={k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
                 average_bits_budgeted=sum(sizes[p] * width_cost(w) for p, w in widths.items()) / total,
                 assigned_average_bits=assign["average_bits"] if assign else None,
                 average_bits_stored=sum(sizes[p] * stored_bits(w) for p, w in widths.items()) / total,
                 width_counts=counts, compile_seconds=round(compile_s, 1), ppl_ratio_vs_fp32=r["ppl"] / fp["ppl"])
        report["results"].append(r)
        write_json(args.out, report)
        print(f"{name}: ppl {r['ppl']:.3f} (avg bits {r['average_bits_budgeted']:.3f} budgeted, "
              f"{r['average_bits_stored']:.3f} stored) {counts}", flush=True)
        del cm
    base = next(r["ppl"] for r in report["results"] if r["entry"] == "uniform W3")
    report["table"] = "\n".join(
        ["| entry | avg bits (budget) | avg bits (stored) | ppl | x uniform W3 |", "|---|---|---|---|---|"]
        + [f"| {r['entry']} | {r.get('average_bits_budgeted', 32):.3f} | {r.get('average_bits_stored', 32):.3f} | "
           f"{r['ppl']:.2f} | {r['ppl'] / base:.3f} |" for r in report["results"]])
    write_json(args.out, report)
    print(report["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
