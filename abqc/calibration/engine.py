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
from .blocks import BlockInput, StopForward, capture_block_inputs, decoder_blocks, run_block

log = logging.getLogger("abqc")

#: solve(method, W, sigma, spec, **options) -> result with .codes .scale .zero .outliers .stats .weight()
Solver = Callable[..., object]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Grams:
    """Accumulates Σ = X Xᵀ / n (fp32) for a group of linears via forward pre-hooks.

    Once every linear of the group has seen its input, the rest of the block is not
    needed: the hook ends the forward pass (`StopForward`), which saves most of the block
    for the early groups ([q,k,v] needs only the norm).
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sigma = {p: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                      for p, m in linears.items()}
        self.n = dict.fromkeys(linears, 0)
        self.seen: set[str] = set()
        self.handles = [m.register_forward_pre_hook(self._hook(p)) for p, m in linears.items()]

    def _hook(self, path: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sigma[path].addmm_(x.T, x)
            self.n[path] += x.shape[0]
            self.seen.add(path)
            if len(self.seen) == len(self.sigma):
                raise StopForward
        return hook

    def run(self, block: nn.Module, inputs: list[BlockInput]) -> None:
        for inp in inputs:
            self.seen.clear()
            try:
                run_block(block, inp)
            except StopForward:
                pass

    def result(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {p: s / max(self.n[p], 1) for p, s in self.sigma.items()}


def _act_quant_hook(spec):
    def hook(module, args):
        x = args[0]
        s, z = compute_qparams(x, spec.qmax, spec.symmetric, spec.group_size)
        return (fake_quantize(x, s, z, spec.qmax, spec.group_size),) + tuple(args[1:])
    return hook


#: step(index, local_prefix, qblock, inputs, fp_block, fp_inputs): quantize `qblock` (a float
#: copy of block `index`) in place; `inputs` are its cached inputs from the quantized chain.
#: With ``fp_chain``, `fp_block` is an untouched float copy and `fp_inputs` the float chain's
#: inputs; otherwise both are None.
BlockStep = Callable[[int, str, nn.Module, list[BlockInput], nn.Module | None,
                      list[BlockInput] | None], None]


def run_blocks(model: nn.Module, windows: torch.Tensor, step: BlockStep, batch_size: int = 8,
               fp_chain: bool = False, desc: str = "calibrate", device: str | None = None) -> None:
    """The block-sequential loop: cache block 0's inputs, then per block copy it, let `step`
    quantize the copy, and feed the quantized block's outputs to the next block.

    ``fp_chain=True`` also carries the float model's block inputs (for losses that compare
    against the float chain, as ABQ's DLC does). The user's model is never modified. With
    ``device`` (e.g. "cuda"), the cached inputs and one block copy at a time live there; the
    model itself stays where it is.
    """
    prefix, blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    inputs: list[BlockInput] = capture_block_inputs(model, blocks, windows, batch_size)
    if device is not None:
        inputs = [i.to(device) for i in inputs]
    fp_inputs = [BlockInput(i.hidden, i.args, i.kwargs) for i in inputs] if fp_chain else None
    log.info("calibration: %d windows x %d tokens, %d blocks, inputs cached in %.1fs",
             len(windows), windows.shape[1], len(blocks), time.perf_counter() - t0)
    for b in tqdm(range(len(blocks)), desc=desc, unit="block"):
        qblock = copy.deepcopy(blocks[b]).float().to(device)
        fp_block = (copy.deepcopy(blocks[b]).float().to(device).requires_grad_(False)
                    if fp_chain else None)
        step(b, f"{prefix}.{b}.", qblock, inputs, fp_block, fp_inputs)
        with torch.no_grad():
            for inp in inputs:
                inp.hidden = run_block(qblock, inp)
            for inp in fp_inputs or ():
                inp.hidden = run_block(fp_block, inp)
        del qblock, fp_block
    gpu = (f", peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB on {device}"
           if device is not None and torch.device(device).type == "cuda" else "")
    log.info("calibration done in %.1fs, peak RSS %.0f MB%s", time.perf_counter() - t0,
             peak_rss_mb(), gpu)


@torch.no_grad()
def calibrate_blocks(model: nn.Module, annotations: dict[str, LinearAnnotation],
                     groups: dict[int, list[list[str]]], windows: torch.Tensor, solve: Solver,
                     batch_size: int = 8, solver_options: dict | None = None,
                     device: str = "cpu") -> dict[str, object]:
    """Solve every annotated linear inside the decoder blocks; return path -> solver result.

    `groups` gives, per block index, the module paths to solve together, in order. The
    user's model is not modified: each block is copied, quantized and discarded. Solving
    happens on ``device``; the results come back on the CPU.
    """
    results: dict[str, object] = {}

    def step(b, local, qblock, inputs, _fp_block, _fp_inputs):
        for group in groups.get(b, []):
            todo = [p for p in group if p in annotations]
            if not todo:
                continue
            mods = {p: qblock.get_submodule(p[len(local):]) for p in todo}
            grams = _Grams(mods)
            grams.run(qblock, inputs)
            sigmas = grams.result()
            for p, m in mods.items():
                ann = annotations[p]
                sigma = sigmas.pop(p)
                t1 = time.perf_counter()
                res = solve(ann.method, m.weight.data, sigma, ann.weight, **(solver_options or {}))
                m.weight.data.copy_(res.weight().to(m.weight.dtype))
                res = res.to("cpu")
                if ann.act is not None:
                    m.register_forward_pre_hook(_act_quant_hook(ann.act))
                results[p] = res
                notes = "; ".join(res.stats.get("notes", []))
                log.info("%-40s %-16s W%d rel.err %.5f  %.2fs  peak %.0f MB%s", p, ann.method,
                         ann.weight.bits, res.stats["rel_error"], time.perf_counter() - t1,
                         peak_rss_mb(), f"  ({notes})" if notes else "")

    run_blocks(model, windows, step, batch_size, device=device)
    return results
