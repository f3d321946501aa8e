"""QuantEase's sweep on a GPU: the fused Triton block kernel against the torch sweep.

    python bench/solver_gpu.py --out bench/results/solver_gpu.json

One SmolLM2-sized layer pair (576x1536 and 1536x576, 3-bit, group 128, 30 sweeps) solved
on CUDA with the Triton kernel and with ``ABQC_TRITON=0`` (the torch sweep: ~10 launches
per column), each in its own process; also on the CPU for the same weights. Writes the
seconds of each and the relative error, so the kernels are compared on equal results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from abqc.atomic import write_json  # noqa: E402
from machine import machine_info  # noqa: E402

SHAPES = ((576, 1536), (1536, 576))


def one(device: str) -> dict:
    import time

    import torch

    from abqc.config import QuantSpec
    from abqc.solvers import solve
    from abqc.solvers.synthetic import synthetic_layer

    spec = QuantSpec(bits=3, granularity="group", group_size=128)
    out = {}
    for n, k in SHAPES:
        w, sigma = synthetic_layer(n=n, k=k, t=4096, seed=0)
        w, sigma = w.to(device), sigma.to(device)
        solve("quantease", w, sigma, spec, sweeps=1)  # warm-up: Triton compiles, CUDA context
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = solve("quantease", w, sigma, spec, sweeps=30)
        if device != "cpu":
            torch.cuda.synchronize()
        out[f"{n}x{k}"] = {"seconds": round(time.perf_counter() - t0, 3),
                           "rel_error": res.stats["rel_error"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "solver_gpu.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    import torch

    runs = {}
    for name, device, env in (("cuda_triton", "cuda", {}), ("cuda_torch", "cuda", {"ABQC_TRITON": "0"}),
                              ("cpu_torch", "cpu", {})):
        p = subprocess.run([sys.executable, __file__, "--one", device], capture_output=True, text=True,
                           env=dict(os.environ, **env), check=True)
        runs[name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(name, runs[name], flush=True)
    ratios = {shape: {"torch_over_triton": runs["cuda_torch"][shape]["seconds"] /
                      runs["cuda_triton"][shape]["seconds"],
                      "cpu_over_triton": runs["cpu_torch"][shape]["seconds"] /
                      runs["cuda_triton"][shape]["seconds"]} for shape in runs["cuda_triton"]}
    write_json(args.out, {"benchmark": "solver_gpu", "command": "python " + " ".join(sys.argv),
                          "date": datetime.datetime.now().isoformat(timespec="seconds"),
                          "machine": {**machine_info(), "gpu": torch.cuda.get_device_name()},
                          "setup": "quantease, 3-bit, group 128, 30 sweeps, synthetic layer",
                          "runs": runs, "ratios": ratios})
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
