"""The block-sequential loop: one decoder block at a time, on a copy, quantized layers feeding
the next ones. Only the cached block inputs are per-sample state."""
from __future__ import annotations

import copy
import logging
import resource
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import LinearAnnotation
from ..quantizer import compute_qparams, fake_quantize
from .blocks import BlockInput, capture_block_inputs, decoder_blocks, run_block

log = logging.getLogger("abqc")

#: solve(method, W, sigma, spec, **options) -> result with .codes .scale .zero .outliers .stats .weight()
Solver = Callable[..., object]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Gram:
    """Accumulates Σ = X Xᵀ / n (fp32) from a linear's inputs via a forward pre-hook."""

    def __init__(self, linear: nn.Linear):
        k = linear.in_features
        self.sigma = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0
        self.handle = linear.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.sigma.addmm_(x.T, x)
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        self.handle.remove()
        return self.sigma / max(self.n, 1)


def _act_quant_hook(spec):
    def hook(module, args):
        x = args[0]
        s, z = compute_qparams(x, spec.qmax, spec.symmetric, spec.group_size)
        return (fake_quantize(x, s, z, spec.qmax, spec.group_size),) + tuple(args[1:])
    return hook


@torch.no_grad()
def calibrate_blocks(model: nn.Module, annotations: dict[str, LinearAnnotation],
                     groups: dict[int, list[list[str]]], windows: torch.Tensor, solve: Solver,
                     batch_size: int = 8, solver_options: dict | None = None) -> dict[str, object]:
    """Solve every annotated linear inside the decoder blocks; return path -> solver result.

    `groups` gives, per block index, the module paths to solve together, in order. The
    user's model is not modified: each block is copied, quantized and discarded.
    """
    prefix, blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    inputs: list[BlockInput] = capture_block_inputs(model, blocks, windows, batch_size)
    log.info("calibration: %d windows x %d tokens, %d blocks, inputs cached in %.1fs",
             len(windows), windows.shape[1], len(blocks), time.perf_counter() - t0)
    results: dict[str, object] = {}
    for b in tqdm(range(len(blocks)), desc="calibrate", unit="block"):
        qblock = copy.deepcopy(blocks[b]).float()
        local = f"{prefix}.{b}."
        for group in groups.get(b, []):
            todo = [p for p in group if p in annotations]
            if not todo:
                continue
            mods = {p: qblock.get_submodule(p[len(local):]) for p in todo}
            grams = {p: _Gram(m) for p, m in mods.items()}
            for inp in inputs:
                run_block(qblock, inp)
            for p, m in mods.items():
                ann = annotations[p]
                sigma = grams[p].result()
                t1 = time.perf_counter()
                res = solve(ann.method, m.weight.data, sigma, ann.weight, **(solver_options or {}))
                m.weight.data.copy_(res.weight().to(m.weight.dtype))
                if ann.act is not None:
                    m.register_forward_pre_hook(_act_quant_hook(ann.act))
                results[p] = res
                notes = "; ".join(res.stats.get("notes", []))
                log.info("%-40s %-16s W%d rel.err %.5f  %.2fs  peak %.0f MB%s", p, ann.method,
                         ann.weight.bits, res.stats["rel_error"], time.perf_counter() - t1,
                         peak_rss_mb(), f"  ({notes})" if notes else "")
        for inp in inputs:
            inp.hidden = run_block(qblock, inp)
        del qblock
    log.info("calibration done in %.1fs, peak RSS %.0f MB", time.perf_counter() - t0, peak_rss_mb())
    return results
