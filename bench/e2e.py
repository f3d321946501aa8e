"""End to end on SmolLM2-135M: the compiled model on its kernels against the fp32 model.

    python bench/e2e.py                                  # FP32, W4A8, W4A4, W2*A8, W4A16
    python bench/e2e.py --configs W4A8 --ppl-windows 32  # + WikiText-2 ppl, kernels vs fake quant

Per configuration, in its own process (so resident memory is its own): prefill time for
--prompt tokens, decode ms/token at that context (KV cache, one token at a time, median of
--decode-tokens steps), resident memory after compile + a prefill, and the size of the
saved model. With --ppl-windows N it also evaluates WikiText-2 (seqlen 2048, first N
windows) on the kernels, on the fake-quant graph of the same compile (float32 F.linear) and
on its fake-quant modules (`cm.fake_quant_model()`, rounded as the integer kernels round). Each quantized
row carries its ratio to the FP32 row of the same run. Results: bench/results/e2e.json.
Threads: torch and TVM thread counts are set explicitly (--torch-threads, --tvm-threads)
and recorded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from abqc.atomic import write_json  # noqa: E402
from machine import machine_info  # noqa: E402

CONFIGS = {"FP32": None, "W4A8": (4, 8), "W4A4": (4, 4), "W2*A8": ("2*", 8), "W2A8": (2, 8),
           "W4A16": (4, 16), "W8A8": (8, 8)}
HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2 ** 20


def time_model(model, prompt_ids, decode_tokens: int) -> dict:
    """Prefill seconds (median of 3) and decode ms/token with transformers' KV cache."""
    import torch

    with torch.no_grad():
        model(prompt_ids[:, :8])  # warm-up: kernels loaded, pools started
        pre = []
        for _ in range(3):
            t = time.perf_counter()
            out = model(prompt_ids, use_cache=True)
            pre.append(time.perf_counter() - t)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode_tokens):
            t = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - t)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        breakdown = decode_breakdown(model, nxt, past, decode_tokens)
    ms = statistics.median(steps) * 1e3
    return {"prefill_s": round(statistics.median(pre), 4), "decode_ms_per_token": round(ms, 3),
            "decode_tokens_per_s": round(1e3 / ms, 2), "decode_breakdown_ms": breakdown}


def decode_breakdown(model, nxt, past, steps: int) -> dict:
    """Where a decode step's time goes (mean ms per token): quantized linears, float linears
    (lm_head), everything else (attention, norms, transformers/Python). Measured with
    forward hooks in separate steps, so the hooks' own cost does not touch the main timing."""
    import torch

    spent = {"quantized_linears": 0.0, "float_linears": 0.0}
    starts: dict[int, float] = {}

    def pre(m, _):
        starts[id(m)] = time.perf_counter()

    def post(kind):
        def hook(m, _, __):
            spent[kind] += time.perf_counter() - starts.pop(id(m))
        return hook

    handles = []
    for m in model.modules():
        kind = ("quantized_linears" if type(m).__name__ == "QuantLinear"
                else "float_linears" if isinstance(m, torch.nn.Linear) else None)
        if kind:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post(kind))]
    try:
        t = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        total = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    ms = {k: round(v / steps * 1e3, 2) for k, v in spent.items()}
    ms["other"] = round(total / steps * 1e3 - sum(ms.values()), 2)
    ms["total_with_hooks"] = round(total / steps * 1e3, 2)
    return ms


def _prompt(tok, n: int):
    from frontends import corpus

    return tok(corpus.load_text("pydoc")[:20000], return_tensors="pt").input_ids[:, :n]


def run_saved(args) -> dict:
    """Child: load a saved model (as a user would), then time it and read its memory."""
    import torch

    import abqc

    torch.set_num_threads(args.torch_threads)
    cm = abqc.load(args.saved)
    row = time_model(cm.hf_model, _prompt(cm.tokenizer, args.prompt), args.decode_tokens)
    row["rss_mb"] = round(rss_mb())
    return row


def run_one(args) -> dict:
    import torch

    import abqc
    import abqc.eval
    from frontends import corpus, hf

    torch.set_num_threads(args.torch_threads)
    model, tok = hf.load(args.model)
    row = {"config": args.one, "torch_threads": torch.get_num_threads(),
           "tvm_threads": int(os.environ.get("TVM_NUM_THREADS", "0"))}
    tmp = tempfile.mkdtemp(prefix="abqc-e2e-")
    try:
        if args.one == "FP32":
            row.update(time_model(model, _prompt(tok, args.prompt), args.decode_tokens))
            row["rss_mb"] = round(rss_mb())
            model.save_pretrained(tmp)
        else:
            w, a = CONFIGS[args.one]
            t = time.perf_counter()
            # lm_head (576 x 49152, tied to the embedding: the largest matrix read per token)
            # on an 8-bit kernel by default; --lm-head-bits 16 keeps it float
            head = {"lm_head_bits": args.lm_head_bits}
            cm = abqc.compile(model, wbits=w, abits=a, tokenizer=tok, tune=args.tune, **head)
            row["lm_head_bits"] = args.lm_head_bits
            row["compile_s"] = round(time.perf_counter() - t, 1)
            row["peak_rss_mb_compile"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            row["formulations"] = sorted({k.rsplit("f=", 1)[-1] for k in
                                          (s["format"] for s in _layers(cm).values())})
            cm.save(tmp)
            # time and measure the saved model in a fresh process: the deployment footprint
            child = os.path.join(tmp, "run.json")
            subprocess.run([sys.executable, __file__, "--saved", tmp, "--child-out", child,
                            f"--prompt={args.prompt}", f"--decode-tokens={args.decode_tokens}",
                            f"--torch-threads={args.torch_threads}"], check=True)
            row.update(json.load(open(child)))
            os.remove(child)
            if args.ppl_windows:
                ref = abqc.compile(model, wbits=w, abits=a, backend="fake_quant", **head)
                windows = corpus.eval_windows(tok, corpus.load_text("wikitext2"), 2048, args.ppl_windows)
                t = time.perf_counter()
                row["ppl_kernels"] = abqc.eval.perplexity_of_windows(cm, windows, desc="kernels")["ppl"]
                row["ppl_eval_s_kernels"] = round(time.perf_counter() - t, 1)
                t = time.perf_counter()
                row["ppl_fake_quant"] = abqc.eval.perplexity_of_windows(ref, windows, desc="fake")["ppl"]
                row["ppl_eval_s_fake_quant"] = round(time.perf_counter() - t, 1)
                row["ppl_rel_diff"] = row["ppl_kernels"] / row["ppl_fake_quant"] - 1
                # the fake-quant modules (torch, rounded as the integer kernels round)
                t = time.perf_counter()
                row["ppl_fake_quant_modules"] = abqc.eval.perplexity_of_windows(
                    cm.fake_quant_model(), windows, desc="fake-quant modules")["ppl"]
                row["ppl_eval_s_fake_quant_modules"] = round(time.perf_counter() - t, 1)
                row["ppl_rel_diff_modules"] = row["ppl_kernels"] / row["ppl_fake_quant_modules"] - 1
                row["ppl_windows"] = args.ppl_windows
        row["saved_mb"] = round(dir_mb(tmp), 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def _layers(cm) -> dict:
    from abqc.runtime.layers import layer_table

    return layer_table(cm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", default="FP32,W4A8,W4A4,W2*A8,W4A16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--ppl-windows", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tvm-threads", type=int, default=1)
    ap.add_argument("--tune", action="store_true", help="tune unknown kernel keys first")
    ap.add_argument("--lm-head-bits", type=int, default=8,
                    help="lm_head weight bits (8, the compile default; 16 keeps it in float)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--saved", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.saved:
        write_json(args.child_out, run_saved(args))
        return
    if args.one:
        write_json(args.child_out, run_one(args))
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {list(CONFIGS)}")
    report = {"benchmark": "e2e", "command": "python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
              "model": "SmolLM2-135M-Instruct (FP32 = dequantized GGUF Q4_1)", "method": "rtn",
              "prompt_tokens": args.prompt, "results": [],
              "env": {k: v for k, v in os.environ.items() if k.startswith(("TVM_", "OMP_", "ABQC_"))}}
    env = dict(os.environ, TVM_NUM_THREADS=str(args.tvm_threads), HF_HUB_OFFLINE="1",
               ABQC_TUNE="1" if args.tune else "0")
    for name in names:
        child = args.out + ".child.json"
        cmd = [sys.executable, __file__, "--one", name, "--child-out", child] + \
            [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("model", "prompt", "decode_tokens", "ppl_windows", "torch_threads")] + \
            (["--tune"] if args.tune else []) + ["--lm-head-bits", str(args.lm_head_bits)]
        subprocess.run(cmd, check=True, env=env)
        r = json.load(open(child))
        os.remove(child)
        fp = next((x for x in report["results"] if x["config"] == "FP32"), None)
        if fp and name != "FP32":
            r["prefill_speedup_vs_fp32"] = round(fp["prefill_s"] / r["prefill_s"], 3)
            r["decode_speedup_vs_fp32"] = round(fp["decode_ms_per_token"] / r["decode_ms_per_token"], 3)
            r["saved_size_ratio_vs_fp32"] = round(r["saved_mb"] / fp["saved_mb"], 4)
        report["results"].append(r)
        write_json(args.out, report)
        print(json.dumps(r), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
