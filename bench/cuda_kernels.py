"""b1 tensor-core kernels on a GPU: exactness for every WxAy, tuning, timings vs torch.

    python bench/cuda_kernels.py                   # -> bench/results/cuda_kernels_<gpu>.json
    python bench/cuda_kernels.py --bits w2a8,w4a4 --shapes 4096x4096 --ms 1,16

1. bit-exact integer accumulators against ``xq @ wq.T`` for all 64 (wbits, abits), decode
   kernels (M = 1, 5, 8) and the GEMM kernel (M = 37), awkward N and K; the float output
   against the fake-quant reference;
2. tuning (the shared tuning log, keys ``cuda-smXY|...``) for the CPU bench's shapes;
3. timings of the tuned kernel (kernel alone, and with activation quantization + packing)
   against torch fp16 ``x @ w.T`` and ``torch._int_mm`` (int8), in the same process.
Refuses to run without CUDA.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

SHAPES = ((576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096))  # (N, K)
MS = (1, 16, 128)
BITS = ("w1a1", "w2a2", "w2a8", "w3a8", "w4a4", "w4a8", "w8a8")


def _parse_bits(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"w([1-8])a([1-8])", item.strip())
        if not m:
            raise SystemExit(f"--bits item {item!r} is not of the form wXaY with X, Y in 1..8")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def exactness(device) -> list[dict]:
    from abqc.codegen.compute import KernelShape
    from abqc.codegen.cuda.runtime import CudaKernel, device_arch, kernel_for
    from abqc.codegen.cuda.space import default, DECODE_MAX_M
    from abqc.codegen.cuda.runtime import problem_for
    from abqc.codegen.kernel import reference
    from abqc.quantizer import compute_qparams, quantize

    arch, rows = device_arch(device), []
    n, k = 200, 1000
    g = torch.Generator().manual_seed(0)
    for wbits, abits in itertools.product(range(1, 9), range(1, 9)):
        shape = KernelShape(n, k, wbits, abits)
        wq = torch.randint(0, 1 << wbits, (n, k), generator=g).to(torch.uint8)
        ok = True
        for m in (1, 5, 8, 37):
            sched = default(problem_for(shape, m), arch)
            kern = CudaKernel(shape, m if m <= DECODE_MAX_M else 128, sched, arch, functions=("acc",))
            xq = torch.randint(0, 1 << abits, (m, k), generator=g).to(torch.uint8)
            w = kern.pack_weight(wq.to(device), torch.ones(n), torch.zeros(n))
            acc = kern.accumulate(xq.to(device), w).cpu()
            ok &= bool(torch.equal(acc, (xq.long() @ wq.long().T).to(torch.int32)))
        wf, x = torch.randn(n, k, generator=g), torch.randn(37, k, generator=g)
        sw, zw = compute_qparams(wf, (1 << wbits) - 1, False)
        codes = quantize(wf, sw, zw, (1 << wbits) - 1).to(torch.uint8)
        kern = kernel_for(shape, 37, device)
        y = kern(x.to(device), kern.pack_weight(codes.to(device), sw, zw)).cpu().double()
        ref = reference(x, codes, sw, zw, shape)
        err = float((y - ref).abs().max() / ref.abs().max())
        rows.append({"wbits": wbits, "abits": abits, "int_exact": ok, "float_rel_err": err})
        print(f"w{wbits}a{abits}: integer {'exact' if ok else 'MISMATCH'}, float rel.err {err:.2e}")
    return rows


def timings(device, bits, shapes, ms, log_path) -> list[dict]:
    from abqc.codegen.compute import KernelShape
    from abqc.codegen.cuda.runtime import kernel_for, time_cuda, tune, _dl
    from abqc.codegen.tuning import TuningLog
    from abqc.codegen.kernel import quantize_activations

    tlog, rows = TuningLog(log_path), []
    g = torch.Generator().manual_seed(1)
    for (n, k), m, (wbits, abits) in itertools.product(shapes, ms, bits):
        shape = KernelShape(n, k, wbits, abits)
        rec = tune(shape, m, device, tlog)
        kern = kernel_for(shape, m, device, tlog)
        x = torch.randn(m, k, generator=g).to(device)
        codes = torch.randint(0, 1 << wbits, (n, k), generator=g).to(torch.uint8).to(device)
        w = kern.pack_weight(codes, torch.rand(n) + 0.5, torch.zeros(n))
        xq, sx, zx = quantize_activations(x, abits)
        rows_m = m if kern.problem.decode_m else -(-m // kern.sched.bm) * kern.sched.bm
        pad = lambda t, d: torch.nn.functional.pad(t.reshape(-1).to(d), (0, rows_m - m)).contiguous()  # noqa: E731
        y = torch.empty(rows_m, kern.np_, dtype=torch.float32, device=device)
        args = _dl(kern.activation_words(xq), w.words, pad(sx, torch.float32), pad(zx, torch.float32),
                   pad(xq.to(torch.int32).sum(1), torch.int32), w.scale, w.zero, w.sumw, w.kg, y)
        main = kern.ex["main"]
        t_kernel = time_cuda(lambda: main(*args))
        t_e2e = time_cuda(lambda: kern(x, w))
        xh, wh = x.half(), torch.randn(n, k, device=device, dtype=torch.float16)
        t_fp16 = time_cuda(lambda: xh @ wh.T)
        mi = max(m, 17)  # torch._int_mm needs more than 16 rows
        xi = torch.randint(-128, 127, (mi, k), device=device, dtype=torch.int8)
        wi = torch.randint(-128, 127, (k, n), device=device, dtype=torch.int8)
        try:
            t_int8 = time_cuda(lambda: torch._int_mm(xi, wi))
        except RuntimeError as e:  # shape constraints (K, N multiples of 8)
            t_int8, _ = None, e
        row = {"n": n, "k": k, "m": m, "wbits": wbits, "abits": abits, "schedule": rec["params"],
               "kernel_ms": t_kernel, "with_quant_pack_ms": t_e2e, "torch_fp16_ms": t_fp16,
               "torch_int_mm_ms": t_int8, "int_mm_rows": mi,
               "speedup_vs_fp16": t_fp16 / t_kernel,
               "speedup_vs_int8": (t_int8 / t_kernel) if t_int8 else None}
        rows.append(row)
        print(f"{n}x{k} M={m} w{wbits}a{abits}: {t_kernel:.4f} ms (with quant+pack {t_e2e:.4f}); "
              f"fp16 {t_fp16:.4f}; int8 {t_int8 if t_int8 is None else round(t_int8, 4)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default=",".join(BITS), help="comma list of wXaY to time and tune")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK list")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts")
    ap.add_argument("--skip-exactness", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/cuda_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
                         "here (the compile-level checks are tests/test_cuda_codegen.py)")
    from abqc.atomic import write_json
    from abqc.codegen.cuda.runtime import device_arch
    from machine import machine_info

    device = torch.device("cuda")
    bits = _parse_bits(args.bits)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    name, arch = torch.cuda.get_device_name(device), device_arch(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    result = {"benchmark": "cuda_kernels", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "gpu": name, "arch": arch,
              "exactness": [] if args.skip_exactness else exactness(device)}
    result["timings"] = timings(device, bits, shapes, ms,
                                os.path.join(out_dir, f"cuda_tuning_{slug}.jsonl"))
    out = write_json(os.path.join(out_dir, f"cuda_kernels_{slug}.json"), result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
