"""The decode step on SmolLM2-135M: abqc's engine against transformers and llama.cpp, one run.

    python bench/decode_step.py                          # FP32, W4A8, W2A8, W4A4, W8A8 + llama.cpp
    python bench/decode_step.py --configs W4A8 --no-llama-cpp

Rows, all measured in this process on the same machine, 2 threads, batch 1:
- ``transformers fp32``: the float model, prefill of --prompt tokens (logits of the last
  position only, as generate asks) and decode ms/token at that context (DynamicCache);
- per abqc config: compile seconds (fresh kernel cache unless it was warm: recorded), the
  eager transformers tree (as ``cm.generate(engine=False)`` runs it) and the decode engine
  (as ``cm.generate`` runs it): prefill seconds and decode ms/token at context --prompt;
- llama.cpp F32 and Q4_0 of the same float weights (``convert_hf_to_gguf.py`` of the float
  model, ``llama-quantize`` to Q4_0), ``llama-bench -p 512 -n 32 -d 512 -t 2``.
Each abqc row carries its ratios to transformers fp32 and to llama.cpp Q4_0 of the same run,
and the W4A8 row checks that 32 greedy tokens through the engine equal the eager tree's and
``fake_quant_model()``'s. Load average is recorded before every timing: times taken beside
other work are not comparable (the JSON says so). Results: bench/results/decode_step.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from abqc.atomic import write_json  # noqa: E402
from machine import machine_info  # noqa: E402

CONFIGS = {"W4A8": (4, 8), "W2A8": (2, 8), "W4A4": (4, 4), "W8A8": (8, 8), "W2*A8": ("2*", 8),
           "W4A16": (4, 16)}


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 3)


def time_transformers(model, ids, decode: int, reps: int = 3) -> dict:
    """Prefill (last-position logits) and decode through transformers' own forward."""
    import torch

    with torch.no_grad():
        model(ids[:, :8], logits_to_keep=1)
        pre, out = [], None
        load = os.getloadavg()[0]
        for _ in range(reps):
            t = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            pre.append(time.perf_counter() - t)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode):
            t = time.perf_counter()
            out = model(nxt, cache=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
            nxt = out.logits[:, -1:].argmax(-1)
    return {"prefill_s": round(min(pre), 4), "decode_ms_per_token": _median_ms(steps),
            "load_avg_before": round(load, 2)}


def time_engine(tree, ids, decode: int, reps: int = 3) -> dict:
    """Prefill and decode through the decode engine (what ``cm.generate`` runs)."""
    import torch

    from abqc.runtime.decode.generate import engine_for

    eng = engine_for(tree)
    with torch.no_grad():
        eng.reset(1, ids.shape[1] + decode + 8)
        eng.step(ids[:, :8])
        pre = []
        load = os.getloadavg()[0]
        for _ in range(reps):
            eng.reset(1, ids.shape[1] + decode + 8)
            t = time.perf_counter()
            logits = eng.step(ids)
            pre.append(time.perf_counter() - t)
        nxt = logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode):
            t = time.perf_counter()
            logits = eng.step(nxt)
            steps.append(time.perf_counter() - t)
            nxt = logits[:, -1:].argmax(-1)
    return {"prefill_s": round(min(pre), 4), "decode_ms_per_token": _median_ms(steps),
            "load_avg_before": round(load, 2)}


def greedy_agreement(cm, ids, tokens: int = 32) -> dict:
    """32 greedy tokens through the engine, the eager tree and the fake-quant modules."""
    kw = dict(max_new_tokens=tokens, do_sample=False, pad_token_id=None)
    prompt = ids[:, :64]
    fast = cm.generate(prompt, **kw)
    eager = cm.generate(prompt, engine=False, **kw)
    fq = cm.fake_quant_model().generate(prompt, **kw)
    import torch

    return {"engine_equals_eager_tree": bool(torch.equal(fast, eager)),
            "engine_equals_fake_quant": bool(torch.equal(fast, fq)), "tokens": tokens}


def llama_cpp_rows(model, tok, prompt: int, decode: int) -> dict:
    from anchors import llama_cpp

    out = {}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        f32 = llama_cpp.convert_hf(d, os.path.join(d, "f32.gguf"), "f32")
        q40 = llama_cpp.quantize(f32, os.path.join(d, "q4_0.gguf"), "Q4_0")
        for name, path in (("llama.cpp F32", f32), ("llama.cpp Q4_0", q40)):
            r = llama_cpp.llama_bench(path, prompt=prompt, gen=decode, depth=prompt, threads=2)
            out[name] = {"prefill_s": round(r["pp_seconds"], 4),
                         "decode_ms_per_token": round(r["tg_ms_per_token"], 3),
                         "load_avg_before": round(r["load_avg_before"][0], 2),
                         "size_mb": round(os.path.getsize(path) / 2 ** 20, 1),
                         "llama_bench": f"-p {prompt} -n {decode} -d {prompt} -t 2"}
        out["_llama_cpp"] = {k: v for k, v in llama_cpp.info().items() if k != "dir"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="W4A8,W2A8,W4A4,W8A8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--lm-head-bits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode_step.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import abqc
    from abqc.cache import cache_dir
    from frontends.hf import load

    model, tok = load("default")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g)
    rows: dict = {"transformers fp32": time_transformers(model, ids, args.decode)}
    if not args.no_llama_cpp:
        try:
            rows.update(llama_cpp_rows(model, tok, args.prompt, args.decode))
        except Exception as e:  # the anchor is optional: say why it is missing
            rows["llama.cpp"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    base = rows["transformers fp32"]
    anchor = rows.get("llama.cpp Q4_0")
    for name in [c for c in args.configs.split(",") if c]:
        w, a = CONFIGS[name]
        kdir = cache_dir("kernels")
        kcache = os.listdir(kdir) if os.path.isdir(kdir) else []
        t = time.perf_counter()
        cm = abqc.compile(model, w, a, lm_head_bits=args.lm_head_bits)
        compile_s = time.perf_counter() - t
        tree = cm.hf_model
        eng = time_engine(tree, ids, args.decode)
        eager = time_transformers(tree, ids, min(args.decode, 8), reps=1)
        row = {"compile_s": round(compile_s, 1), "kernel_cache_entries_before": len(kcache),
               "lm_head_bits": args.lm_head_bits, "engine": eng, "eager_tree": eager,
               "decode_x_fp32": round(base["decode_ms_per_token"] / eng["decode_ms_per_token"], 2),
               "prefill_x_fp32": round(base["prefill_s"] / eng["prefill_s"], 2),
               "engine_x_eager_tree": round(eager["decode_ms_per_token"] / eng["decode_ms_per_token"], 2)}
        if anchor:
            row["decode_x_llama_cpp_q4_0"] = round(anchor["decode_ms_per_token"] / eng["decode_ms_per_token"], 2)
            row["prefill_x_llama_cpp_q4_0"] = round(anchor["prefill_s"] / eng["prefill_s"], 2)
        if name == "W4A8":
            row["greedy_32"] = greedy_agreement(cm, ids)
        rows[f"abqc {name}"] = row
        print(name, row, flush=True)
        del cm, tree
    out = {"benchmark": "decode_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": machine_info(), "threads": args.threads, "prompt": args.prompt,
           "decode_tokens": args.decode, "model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)",
           "note": "times with load_avg_before well above 0 ran beside other work",
           "rows": rows}
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
