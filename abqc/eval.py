"""Perplexity, by the protocol of ../shared/data/wikitext-2-raw/README.md, with the
statistics llama.cpp's ``llama-perplexity`` reports.

The text is tokenized once, cut into non-overlapping windows of `seqlen` tokens (the
remainder dropped, optionally only the first `max_windows`), and perplexity is
exp(mean next-token NLL over every predicted token of every window).

Every result carries its standard error (``ppl_stderr`` = ppl x the standard error of the
mean NLL, as llama-perplexity's ``PPL = x +/- e``; tokens are treated as independent, so
it understates the spread across texts), the abqc version and, for a compiled model, its
full `CompileConfig`. With a `reference` model (the float model) it also reports, per
predicted token and averaged as ``llama-perplexity --kl-divergence`` does: the KL
divergence KL(P_ref || P_model) (mean +/- stderr, median, 99th percentile, maximum), the
top-1 agreement ("same top p", with its binomial stderr), the reference perplexity, the
ratio PPL/PPL_ref = exp(mean(NLL - NLL_ref)) +/- stderr, and RMS delta-p (the change of
the probability of the correct token).
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

#: Positions scored at once for the KL divergence (two [chunk, vocab] float32 softmaxes).
KL_CHUNK = 512


def _mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / (n - 1)), as llama-perplexity computes them."""
    x = x.double()
    n = x.numel()
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan")
    var = float((x * x).mean()) - mean * mean
    return mean, math.sqrt(max(var, 0.0) / (n - 1))


def _token_stats(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None):
    """Per predicted position: NLL, and with a reference its NLL, KL(ref || model), top-1
    agreement and p(correct) of both. logits [T, V], targets [T]."""
    out = {"nll": [], "ref_nll": [], "kld": [], "same_top": [], "p": [], "ref_p": []}
    for s in range(0, len(targets), KL_CHUNK):
        t = targets[s:s + KL_CHUNK]
        lp = torch.log_softmax(logits[s:s + KL_CHUNK].float(), -1)
        out["nll"].append(-lp.gather(-1, t[:, None])[:, 0].double())
        if ref_logits is None:
            continue
        rlp = torch.log_softmax(ref_logits[s:s + KL_CHUNK].float(), -1)
        out["ref_nll"].append(-rlp.gather(-1, t[:, None])[:, 0].double())
        out["kld"].append((rlp.exp() * (rlp - lp)).sum(-1).double().clamp_min(0))
        out["same_top"].append((lp.argmax(-1) == rlp.argmax(-1)).double())
        out["p"].append(lp.gather(-1, t[:, None])[:, 0].double().exp())
        out["ref_p"].append(rlp.gather(-1, t[:, None])[:, 0].double().exp())
    return out


@torch.inference_mode()
def perplexity_of_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
                          progress: bool = True, desc: str = "perplexity",
                          reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """Perplexity of `model` (anything whose output has ``.logits``) on token windows [n, L];
    with `reference`, also the KL divergence and top-1 agreement against it."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a [n, seqlen>=2] LongTensor, got shape {tuple(windows.shape)}")
    stats: dict[str, list] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="win")
    nll_sum, count = 0.0, 0
    for i in bar:
        ids = windows[i:i + batch_size]
        logits = model(ids).logits
        ref = reference(ids).logits if reference is not None else None
        if ref is not None and ref.shape != logits.shape:
            raise ValueError(f"reference logits {tuple(ref.shape)} do not match the model's "
                             f"{tuple(logits.shape)}: the reference must share the vocabulary")
        for b in range(len(ids)):
            got = _token_stats(logits[b, :-1], ids[b, 1:], None if ref is None else ref[b, :-1])
            for k, v in got.items():
                stats.setdefault(k, []).extend(v)
            nll_sum += float(sum(float(v.sum()) for v in got["nll"]))
        count += ids[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    cat = {k: torch.cat(v) for k, v in stats.items() if v}
    nll, nll_err = _mean_stderr(cat["nll"])
    ppl = math.exp(nll)
    result: dict[str, Any] = {
        "ppl": ppl, "ppl_stderr": ppl * nll_err, "nll": nll, "nll_stderr": nll_err,
        "windows": len(windows), "seqlen": windows.shape[1], "tokens_predicted": count}
    if reference is not None:
        rnll, rnll_err = _mean_stderr(cat["ref_nll"])
        dlog, dlog_err = _mean_stderr(cat["nll"] - cat["ref_nll"])
        kld, kld_err = _mean_stderr(cat["kld"])
        same = float(cat["same_top"].mean())
        n = cat["same_top"].numel()
        dp = cat["p"] - cat["ref_p"]
        q = torch.quantile(cat["kld"].float(), torch.tensor([0.5, 0.99])).tolist() \
            if cat["kld"].numel() <= 16_000_000 else [float("nan")] * 2
        result.update({
            "reference_ppl": math.exp(rnll), "reference_ppl_stderr": math.exp(rnll) * rnll_err,
            "ppl_ratio": math.exp(dlog), "ppl_ratio_stderr": math.exp(dlog) * dlog_err,
            "mean_ln_ppl_ratio": dlog, "mean_ln_ppl_ratio_stderr": dlog_err,
            "kld_mean": kld, "kld_stderr": kld_err, "kld_median": q[0], "kld_p99": q[1],
            "kld_max": float(cat["kld"].max()),
            "same_top_p": same, "same_top_p_stderr": math.sqrt(same * (1 - same) / max(n - 1, 1)),
            "rms_delta_p": float((dp * dp).mean().sqrt()),
        })
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _config_of(model) -> dict[str, Any] | None:
    from .config import CompileConfig

    cfg = getattr(model, "config", None)
    return cfg.to_dict() if isinstance(cfg, CompileConfig) else None


def _runner(model):
    """What to call for logits: a loaded CompiledModel (`abqc.load`) runs its transformers
    tree, which gives the graph's logits without capturing the graph (no torch.export)."""
    from .compiled import CompiledModel

    if isinstance(model, CompiledModel) and model.saved_layers is not None \
            and "program" not in model._modules and model.hf_model is not None:
        return model.hf_model
    return model


def perplexity(model: torch.nn.Module, tokenizer, data: str = "wikitext2", seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, json_path: str | os.PathLike | None = None,
               progress: bool = True, extra: dict[str, Any] | None = None,
               reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """Perplexity of `model` on `data` ("wikitext2", "pydoc" or a text file path).

    Returns (and, with `json_path`, writes) a dict with ppl +/- ppl_stderr, nll +/-
    nll_stderr, windows, seqlen, tokens_predicted, seconds, the data source, the abqc
    version, ``config`` (the model's CompileConfig, None for a float model), the keys of
    `extra` (labels) and, with `reference` (e.g. the float model), the KL divergence /
    top-1 agreement statistics described in the module docstring.
    """
    from frontends import corpus

    from .version import __version__

    text = corpus.load_text(data)
    windows = corpus.eval_windows(tokenizer, text, seqlen=seqlen, max_windows=max_windows)
    if len(windows) == 0:
        raise ValueError(f"data {data!r} has fewer than seqlen={seqlen} tokens: no window to score")
    result = {"data": str(data),
              **perplexity_of_windows(_runner(model), windows, batch_size, progress,
                                      reference=_runner(reference) if reference is not None else None),
              "abqc_version": __version__, "config": _config_of(model), **(extra or {})}
    if json_path:
        write_json(json_path, result)
    return result
