"""Do calibrated solutions carry over to the evaluation text? Per layer of SmolLM2-135M, the
relative error of rtn / gptq / quantease solved on the calibration corpus' Σ, scored on that
Σ and on WikiText-2's Σ (WikiText only scores, never fits); then GPTQ at higher damping.

    python bench/solver_transfer.py     # -> bench/results/solver_transfer.json (~5 min)

Float model, no sequential quantization: this isolates the solvers from error propagation.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from abqc.atomic import write_json  # noqa: E402
from abqc.config import QuantSpec  # noqa: E402
from abqc.solvers import solve  # noqa: E402
from abqc.solvers.result import relative_error  # noqa: E402
from frontends import corpus, hf  # noqa: E402
from machine import machine_info  # noqa: E402


def grams(model, ids, layers, batch=4):
    """Σ = X Xᵀ / n of every linear input in `layers` over the windows `ids`."""
    acc, handles = {}, []

    def hook(name):
        def h(_, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            s = acc.setdefault(name, [0, 0])
            s[0] = s[0] + x.T @ x
            s[1] += x.shape[0]
        return h

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(f"layers.{i}." in name for i in layers):
            handles.append(mod.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            model(input_ids=ids[i:i + batch], use_cache=False)
    for h in handles:
        h.remove()
    return {k: s / n for k, (s, n) in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,2,15,28")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--wbits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    model, tok = hf.load("default")
    cal = grams(model, corpus.calibration_windows(tok, corpus.load_text("pydoc"), args.nsamples, 512, 0), layers)
    ev = grams(model, corpus.eval_windows(tok, corpus.load_text("wikitext2"), 512, args.nsamples), layers)
    spec = QuantSpec(bits=args.wbits, granularity="group" if args.group_size else "channel",
                     group_size=args.group_size)
    rows = []
    for name, sigma in cal.items():
        w = model.get_submodule(name).weight.data
        row = {"linear": name}
        for label, method, opts in (("rtn", "rtn", {}), ("gptq", "gptq", {}), ("quantease", "quantease", {"sweeps": 10}),
                                    ("gptq_damp0.1", "gptq", {"percdamp": 0.1}), ("gptq_damp1", "gptq", {"percdamp": 1.0})):
            r = solve(method, w, sigma, spec, **opts)
            row[label] = {"calib": r.stats["rel_error"], "wikitext": relative_error(w, r.weight(), ev[name])}
        rows.append(row)
        print(f"{name:36s} " + " | ".join(f"{k} {v['calib']:.4f}/{v['wikitext']:.4f}"
                                          for k, v in row.items() if k != "linear"), flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "solver_transfer.json")
    write_json(out, {"benchmark": "solver_transfer", "command": "python " + " ".join(sys.argv),
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
                     "calibration": f"pydoc {args.nsamples} x 512", "scored_on": f"wikitext2 test {args.nsamples} x 512",
                     "spec": spec.describe(), "results": rows})
    print(f"wrote {out}  (each cell: error on calibration Σ / on WikiText-2 Σ)")


if __name__ == "__main__":
    main()
