"""Sensitivity of SmolLM2-135M's linears at W4A4 (or --wbits/--abits): loss increase on
calibration data per component type (weights alone, activations alone) and per block.

    python bench/sensitivity.py --wbits 4 --abits 4 --nsamples 16 --calib-seqlen 512

Writes bench/results/sensitivity_w{W}a{A}.json and prints the table.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from abqc.capture import capture  # noqa: E402
from abqc.config import CompileConfig  # noqa: E402
from abqc.passes import AnnotateQuant, PassContext  # noqa: E402
from abqc.facts import Sensitivity, facts  # noqa: E402
from abqc.passes.sensitivity import SensitivityAnalysis, format_sensitivity  # noqa: E402
from frontends import corpus, hf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--wbits", default="4")
    ap.add_argument("--abits", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[abqc] %(message)s")
    wbits = args.wbits if args.wbits.endswith("*") else int(args.wbits)
    model, tok = hf.load(args.model)
    cfg = CompileConfig(wbits=wbits, abits=args.abits, nsamples=args.nsamples, seqlen=args.calib_seqlen)
    windows = corpus.calibration_windows(tok, corpus.load_text(cfg.calib_corpus), cfg.nsamples,
                                         cfg.seqlen, cfg.seed)
    out = os.path.join(HERE, "results", f"sensitivity_w{args.wbits.replace('*', 's')}a{args.abits}.json")
    with torch.no_grad(), PassContext(config=cfg, calib=windows):
        gm = SensitivityAnalysis(wbits, args.abits, out=out)(AnnotateQuant(cfg)(capture(model)))
    print(format_sensitivity(facts(gm).get(Sensitivity).report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
