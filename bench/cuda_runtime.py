"""The compiled model's layers on a GPU: `QuantLinear` on the b1 kernels against the CPU kernels.

    python bench/cuda_runtime.py            # needs a CUDA GPU, TVM and nvcc

1. layer level: `QuantLinear` (4096 x 4096 and an awkward 300 x 700) for several WxAy, the
   CUDA branch (b1 tensor-core kernels, launched through the driver API) against the CPU
   kernels (`qlinear_impl`) on the same packed weight: max relative difference, and
   decode time per call (Python launch included) against the fp16 `nn.Linear`;
2. model level: a tiny Llama compiled at W4A8 (RTN) on the CPU (or a saved model, --saved),
   moved to the GPU: logits against the CPU kernels' logits, greedy tokens from ``generate``.
Results: bench/results/cuda_runtime_<gpu>.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def layer_rows(device) -> list[dict]:
    from abqc.quantizer import compute_qparams, quantize
    from abqc.runtime.format import QuantFormat
    from abqc.runtime.qlinear import QuantLinear, qlinear_impl

    rows, g = [], torch.Generator().manual_seed(0)
    for (n, k), (wbits, abits) in [((300, 700), (3, 5)), ((4096, 4096), (2, 8)), ((4096, 4096), (4, 4)),
                                   ((4096, 4096), (4, 8)), ((4096, 4096), (8, 8)), ((4096, 4096), (4, 16))]:
        fmt = QuantFormat(n=n, k=k, wbits=wbits, abits=abits)
        w = torch.randn(n, k, generator=g)
        s, z = compute_qparams(w, (1 << wbits) - 1, False)
        mod = QuantLinear.from_codes(fmt, quantize(w, s, z, (1 << wbits) - 1).to(torch.uint8), s, z,
                                     bias=torch.randn(n, generator=g))
        gpu = QuantLinear.from_codes(fmt, mod.codes(), s, z, bias=mod.bias).to(device)
        for m in (1, 8, 100):
            x = torch.randn(m, k, generator=g)
            ref = qlinear_impl(x, mod.weight_packed, mod.weight_scale, mod.weight_zero_point, mod.weight_sum,
                               mod.group_k, mod.bias, None, None, mod.spec)
            y = gpu(x.to(device)).cpu()
            rel = float((y - ref).abs().max() / ref.abs().max())
            row = {"n": n, "k": k, "wbits": wbits, "abits": abits, "m": m, "max_rel_diff_vs_cpu": rel}
            if m == 1:
                lin = torch.nn.Linear(k, n, device=device, dtype=torch.float16)
                xg, xh = x.to(device), x.to(device).half()
                for _ in range(3):
                    gpu(xg), lin(xh)
                row["quantlinear_call_ms"] = _wall_ms(lambda: gpu(xg))
                row["fp16_linear_call_ms"] = _wall_ms(lambda: lin(xh))
            rows.append(row)
            print(row, flush=True)
    return rows


def _wall_ms(fn, repeat: int = 50) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat * 1e3


def model_rows(device, saved: str | None) -> dict:
    """`saved`: a model saved by ``cm.save`` (loaded with ``from_pretrained``, no capture);
    else a tiny Llama compiled here (capture needs the pinned torch)."""
    import abqc

    if saved:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(saved).eval()
    else:
        from frontends.tiny import tiny_model

        hf = abqc.compile(tiny_model("llama"), wbits=4, abits=8).hf_model
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_logits = hf(ids).logits
        cpu_tokens = hf.generate(ids, max_new_tokens=16, do_sample=False)
        gm = hf.to(device)
        gpu_logits = gm(ids.to(device)).logits.cpu()
        gpu_tokens = gm.generate(ids.to(device), max_new_tokens=16, do_sample=False).cpu()
    quant = sum(type(mm).__name__ == "QuantLinear" for mm in gm.modules())
    out = {"model": "tiny llama (2 layers, hidden 64), W4A8 RTN", "quantlinears_on_gpu": quant,
           "logits_max_abs_diff": float((gpu_logits - cpu_logits).abs().max()),
           "logits_scale": float(cpu_logits.abs().max()),
           "argmax_agreement": float((gpu_logits.argmax(-1) == cpu_logits.argmax(-1)).float().mean()),
           "generate_equal": bool(torch.equal(gpu_tokens, cpu_tokens)),
           "generated_gpu": gpu_tokens[0, 24:].tolist(), "generated_cpu": cpu_tokens[0, 24:].tolist()}
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--saved", help="a saved compiled model to run (default: compile a tiny Llama)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/cuda_runtime.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    from abqc.atomic import write_json
    from machine import machine_info

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    result = {"benchmark": "cuda_runtime", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
              "gpu": name, "layers": layer_rows(device), "model": model_rows(device, args.saved)}
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    print("wrote", write_json(os.path.join(args.out, f"cuda_runtime_{slug}.json"), result))


if __name__ == "__main__":
    main()
