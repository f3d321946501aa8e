"""lm_head on the kernels or in float: SmolLM2-135M (tied 576 x 49152 lm_head), same run.

    python bench/lm_head.py                 # W4A8 body; lm_head float, W8A8, W8A16
    python bench/lm_head.py --ppl-windows 4

Per variant: decode ms/token at context --prompt (KV cache), prefill seconds of --prompt
tokens (all positions' logits), WikiText-2 perplexity (seqlen 2048, first N windows), saved
size. Ratios are to the float-lm_head row of the same run. Results: bench/results/lm_head.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")  # as bench/e2e.py: beside torch's 2 threads (measured there)

import torch  # noqa: E402

import abqc  # noqa: E402
import abqc.eval  # noqa: E402
from abqc.atomic import write_json  # noqa: E402
from e2e import dir_mb, time_model  # noqa: E402
from frontends import corpus, hf  # noqa: E402
from machine import machine_info  # noqa: E402

VARIANTS = {"float": dict(lm_head_bits=16), "W8A8": dict(lm_head_bits=8),
            "W8A16": dict(lm_head_bits=8, overrides={"^lm_head$": {"abits": 16}})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wbits", default="4")
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lm_head.json"))
    args = ap.parse_args()
    wbits = args.wbits if args.wbits == "2*" else int(args.wbits)
    model, tok = hf.load("default")
    prompt = corpus.eval_windows(tok, corpus.load_text("pydoc"), args.prompt, 1)
    windows = corpus.eval_windows(tok, corpus.load_text("wikitext2"), 2048, args.ppl_windows) \
        if args.ppl_windows else None
    res = {"benchmark": "lm_head", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(), "command": " ".join(sys.argv), "body": f"W{wbits}A{args.abits} rtn",
           "torch_threads": torch.get_num_threads(), "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
           "rows": {}}
    for name, kw in VARIANTS.items():
        t = time.perf_counter()
        cm = abqc.compile(model, wbits=wbits, abits=args.abits, **kw)
        row = {"compile_s": round(time.perf_counter() - t, 1), **time_model(cm.hf_model, prompt,
                                                                              args.decode_tokens)}
        if windows is not None:
            row["ppl"] = abqc.eval.perplexity_of_windows(cm.hf_model, windows, progress=False)["ppl"]
        with tempfile.TemporaryDirectory() as d:
            cm.save(os.path.join(d, "m"))
            row["saved_mb"] = round(dir_mb(os.path.join(d, "m")), 1)
        base = res["rows"].get("float")
        if base:
            row["decode_x_float_head"] = round(base["decode_ms_per_token"] / row["decode_ms_per_token"], 3)
            row["prefill_x_float_head"] = round(base["prefill_s"] / row["prefill_s"], 3)
            if "ppl" in row:
                row["ppl_vs_float_head"] = round(row["ppl"] / base["ppl"], 4)
        res["rows"][name] = row
        print(name, {k: v for k, v in row.items() if k != "decode_breakdown_ms"}, flush=True)
        write_json(args.out, res)


if __name__ == "__main__":
    main()
