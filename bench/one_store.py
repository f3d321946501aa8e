"""The "One program" table: every path of a compile has the same error against the float model.

    python bench/one_store.py            # tiny Llama, hidden 128, 2 layers, 4 outlier channels x20

Rows: W8A8 rtn / gptq, each with and without smoothing, and W4A8 abq (1 epoch). Columns: the
graph (cm(ids)), the transformers tree (generate), saved + abqc.load, from_pretrained. Before
the single store the tree took every float tensor from the source model (smoothed rows 1.00).
Results: bench/results/one_store.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("ABQC_TUNE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from abqc.agreement import outlier_model, path_errors  # noqa: E402
from abqc.atomic import write_json  # noqa: E402
from frontends.tiny import tiny_model  # noqa: E402
from machine import machine_info  # noqa: E402

ROWS = {
    "W8A8 rtn": dict(wbits=8, abits=8),
    "W8A8 rtn, smooth": dict(wbits=8, abits=8, smooth=True),
    "W8A8 gptq": dict(wbits=8, abits=8, method="gptq"),
    "W8A8 gptq, smooth": dict(wbits=8, abits=8, method="gptq", smooth=True),
    "W4A8 abq (1 epoch)": dict(wbits=4, abits=8, method="abq", abq_options={"epochs": 1}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "one_store.json"))
    args = ap.parse_args()
    model = outlier_model(tiny_model("llama", hidden_size=128, intermediate_size=256))
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(2))
    result = {"date": datetime.date.today().isoformat(), "machine": machine_info(),
              "model": "tiny llama hidden 128, 2 layers, input norms' first 4 channels x20",
              "metric": "relative logit error vs the float model", "rows": {}}
    print(f"{'compile':<22} {'graph':>8} {'tree':>8} {'loaded':>8} {'from_pre':>8}  seconds")
    for name, kw in ROWS.items():
        t0 = time.perf_counter()
        e = path_errors(model, ids, calib=calib, nsamples=16, seqlen=64, **kw)
        e["seconds"] = round(time.perf_counter() - t0, 1)
        result["rows"][name] = e
        print(f"{name:<22} {e['graph']:8.4f} {e['tree']:8.4f} {e['loaded']:8.4f} "
              f"{e['from_pretrained']:8.4f}  {e['seconds']}", flush=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
