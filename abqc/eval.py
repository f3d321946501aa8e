"""Perplexity, by the protocol of ../shared/data/wikitext-2-raw/README.md.

The text is tokenized once, cut into non-overlapping windows of `seqlen` tokens (the
remainder dropped, optionally only the first `max_windows`), and perplexity is
exp(mean next-token NLL over every predicted token of every window).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import write_json


@torch.inference_mode()
def perplexity_of_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
                          progress: bool = True, desc: str = "perplexity") -> dict[str, Any]:
    """Perplexity of `model` (anything whose output has ``.logits``) on token windows [n, L]."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a [n, seqlen>=2] LongTensor, got shape {tuple(windows.shape)}")
    nll_sum, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="win")
    for i in bar:
        ids = windows[i:i + batch_size]
        logits = model(ids).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              ids[:, 1:].reshape(-1), reduction="sum")
        nll_sum += float(nll)
        count += ids[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    return {"ppl": math.exp(nll_sum / count), "nll": nll_sum / count, "windows": len(windows),
            "seqlen": windows.shape[1], "tokens_predicted": count,
            "seconds": round(time.perf_counter() - t0, 2)}


def perplexity(model: torch.nn.Module, tokenizer, data: str = "wikitext2", seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, json_path: str | os.PathLike | None = None,
               progress: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Perplexity of `model` on `data` ("wikitext2", "pydoc" or a text file path).

    Returns (and, with `json_path`, writes) a dict with ppl, nll, windows, seqlen,
    tokens_predicted, seconds and the data source, plus the keys of `extra` (labels).
    """
    from frontends import corpus

    text = corpus.load_text(data)
    windows = corpus.eval_windows(tokenizer, text, seqlen=seqlen, max_windows=max_windows)
    if len(windows) == 0:
        raise ValueError(f"data {data!r} has fewer than seqlen={seqlen} tokens: no window to score")
    result = {"data": str(data), **perplexity_of_windows(model, windows, batch_size, progress),
              **(extra or {})}
    if json_path:
        write_json(json_path, result)
    return result
