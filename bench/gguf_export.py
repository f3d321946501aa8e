"""abqc's GGUF export against llama.cpp's own quantizer, measured by llama.cpp's llama-perplexity.

    python bench/anchors/llama_cpp.py build          # once (~15 min on 2 cores, cached)
    python bench/gguf_export.py                      # Q4_0 and Q3_K, gptq; 32 windows of 2048
    python bench/gguf_export.py --types Q4_0 --methods gptq,quantease --rows abqc

On the embedded SmolLM2-135M. Both sides start from the same float weights: the F32 GGUF that
llama.cpp's convert_hf_to_gguf.py makes of the model abqc loads (the shipped Q4_1
dequantized). Rows, per type T:

- ``llama-quantize T --pure`` (+ ``--imatrix``): every tensor in T with llama.cpp's shape
  fallbacks, the embedding in Q8_0: the same tensor types as abqc's export, checked tensor
  by tensor (``same_types_as_abqc``);
- ``llama-quantize T`` + imatrix: llama.cpp's default mix for T (more bits on some tensors);
- abqc ``export --format gguf --type T --method M``.

The importance matrix comes from ``llama-imatrix`` on abqc's own calibration text (pydoc,
the same 128 x 512 tokens budget), never on WikiText, which is evaluation only. Perplexity:
``llama-perplexity -c 2048 --chunks 32`` on WikiText-2 test. ``llama_bench`` rows time
prefill 512 / decode 32 at depth 512 on 2 threads, with the load average before each.
Results: bench/results/gguf_export.json (written after every row).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from abqc.atomic import write_json  # noqa: E402
from abqc.cache import cache_dir  # noqa: E402
from anchors import llama_cpp  # noqa: E402
from machine import machine_info  # noqa: E402

WIKI = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def tensor_summary(path: Path) -> dict:
    """Types per tensor, bits per weight over all tensors and over the 2-D weights of the blocks."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    types, nbytes, nel, bbytes, bel = {}, 0, 0, 0, 0
    for t in r.tensors:
        types[t.name] = t.tensor_type.name
        n = int(np.prod([int(x) for x in t.shape]))
        nbytes += int(t.n_bytes)
        nel += n
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bbytes += int(t.n_bytes)
            bel += n
    counts: dict[str, int] = {}
    for v in types.values():
        counts[v] = counts.get(v, 0) + 1
    return {"types": types, "type_counts": counts, "bpw_all": 8 * nbytes / nel,
            "bpw_block_linears": 8 * bbytes / bel if bel else None, "file_bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="Q4_0,Q3_K")
    ap.add_argument("--methods", default="gptq")
    ap.add_argument("--rows", default="f32,llama,abqc,bench", help="which rows to (re)run")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="where the GGUF files go (default: the abqc cache)")
    ap.add_argument("--out", default=str(HERE / "results" / "gguf_export.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows_wanted = set(a.rows.split(","))
    work = Path(a.work) if a.work else cache_dir("gguf_bench")
    work.mkdir(parents=True, exist_ok=True)

    build = llama_cpp.build()
    out_path = Path(a.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "machine": machine_info(), "llama_cpp": {k: v for k, v in llama_cpp.info().items()
                                                             if k != "dir"},
                   "protocol": {"data": "wikitext-2-raw wiki.test.raw", "ctx": 2048, "chunks": a.chunks,
                                "tool": "llama-perplexity", "threads": a.threads,
                                "calibration": "pydoc (abqc's calib_corpus default), imatrix -c 512 "
                                               "--chunks 128; abqc 128 windows x 512"}})
    rows = result.setdefault("rows", {})

    def save():
        write_json(out_path, result)

    def ppl_row(key: str, path: Path, extra: dict) -> None:
        t0 = time.perf_counter()
        load = os.getloadavg()
        r = llama_cpp.perplexity(path, WIKI, ctx=2048, chunks=a.chunks, threads=a.threads)
        summ = tensor_summary(path)
        rows[key] = {**extra, **r, "load_avg_before": load, "file": path.name,
                     "file_mb": summ["file_bytes"] / 2**20, "bpw_all": summ["bpw_all"],
                     "bpw_block_linears": summ["bpw_block_linears"], "type_counts": summ["type_counts"],
                     "wall_s": time.perf_counter() - t0}
        print(f"{key:<34} ppl {r['ppl']:.4f} +/- {r['ppl_stderr']:.4f}  {summ['bpw_all']:.3f} bpw "
              f"{summ['type_counts']}", flush=True)
        save()

    from frontends.embedded import default_model_dir

    f32 = work / "smollm2-f32.gguf"
    if not f32.is_file():
        llama_cpp.convert_hf(default_model_dir(), f32, "f32")
    calib_txt = work / "calib_pydoc.txt"
    if not calib_txt.is_file():
        from frontends import corpus

        calib_txt.write_text(corpus.pydoc_text())
    if "f32" in rows_wanted:
        ppl_row("F32", f32, {"source": "convert_hf_to_gguf.py --outtype f32"})

    imat = work / "imatrix-pydoc.gguf"
    types = a.types.split(",")
    if "llama" in rows_wanted:
        if not imat.is_file():
            t0 = time.perf_counter()
            llama_cpp.imatrix(f32, calib_txt, imat, ctx=512, chunks=128, threads=a.threads)
            result["imatrix_seconds"] = time.perf_counter() - t0
        for t in types:
            for name, kw in (("pure", {"pure": True}), ("pure+imatrix", {"pure": True, "imatrix": imat}),
                             ("default+imatrix", {"imatrix": imat})):
                p = work / f"llama-{t}-{name.replace('+', '-')}.gguf"
                if not p.is_file():
                    emb = {"token_embedding_type": "q8_0", "output_tensor_type": "q8_0"} if kw.get("pure") else {}
                    llama_cpp.quantize(f32, p, t, threads=a.threads, **kw, **emb)
                ppl_row(f"llama-quantize {t} {name}", p, {"type": t, "quantizer": "llama-quantize", "mix": name})
    if "abqc" in rows_wanted:
        from abqc.export import export

        for t in types:
            for m in a.methods.split(","):
                p = work / f"abqc-{t}-{m}.gguf"
                secs = None
                if not p.is_file():
                    t0 = time.perf_counter()
                    export("default", p, "gguf", type=t, method=m, template=f32)
                    secs = time.perf_counter() - t0
                key = f"abqc {t} {m}"
                ppl_row(key, p, {"type": t, "quantizer": "abqc export", "method": m,
                                 "export_seconds": secs if secs is not None else
                                 rows.get(key, {}).get("export_seconds")})
                ref = work / f"llama-{t}-pure.gguf"
                if ref.is_file():
                    rows[key]["same_types_as_llama_pure"] = tensor_summary(ref)["types"] == tensor_summary(p)["types"]
                    save()
    if "bench" in rows_wanted:
        q4 = work / "abqc-Q4_0-gptq.gguf"
        bench = result.setdefault("llama_bench", {})
        for key, p in (("F32", f32), ("abqc Q4_0 gptq", q4)):
            if p.is_file():
                bench[key] = llama_cpp.llama_bench(p, prompt=512, gen=32, depth=512, threads=a.threads)
                bench[key].pop("llama_cpp", None)
                print(key, {k: v for k, v in bench[key].items() if k != "raw"}, flush=True)
                save()
    print(f"wrote {out_path} (llama.cpp build {build})")


if __name__ == "__main__":
    main()
