"""Layer-wise solvers: quantize one linear's weight given its input statistics Σ = X Xᵀ.

``solve(method, W, Σ, spec, **options) -> SolveResult`` is the one interface the
calibration engine calls; `SOLVERS` maps each method name to its function.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..config import BLOCK_METHODS, METHODS, QuantSpec
from ..errors import ConfigError
from .gptq import CholeskyError, gptq
from .grid import Grid
from .options import SolverOptions
from .outliers import quantease_outlier
from .quantease import damped, quantease
from .result import SolveResult, relative_error

log = logging.getLogger("abqc")


def _result(grid: Grid, w_hat: torch.Tensor, outliers: torch.Tensor | None = None) -> SolveResult:
    return SolveResult(codes=grid.codes(w_hat), scale=grid.scale, zero=grid.zero,
                       group_size=grid.group_size, outliers=outliers)


def _grid(w, spec, grid: Grid | None) -> Grid:
    """The fixed grid handed in (an export format's own, e.g. a GGUF block type), or the
    min/max grid of `spec` fitted on `w`."""
    return Grid.fit(w, spec) if grid is None else grid


def solve_rtn(w, sigma, spec, opts: SolverOptions, notes: list[str], grid=None) -> SolveResult:
    grid = _grid(w, spec, grid)
    return _result(grid, w.float())


def solve_quantease(w, sigma, spec, opts: SolverOptions, notes: list[str],
                    grid=None) -> SolveResult:
    grid = _grid(w, spec, grid)
    w_hat = quantease(w, damped(sigma, opts.qe_damp), grid, opts.sweeps, opts.relax,
                      opts.act_order, opts.blocksize)
    return _result(grid, w_hat)


def _gptq(w, sigma, spec, opts: SolverOptions, notes: list[str], grid=None):
    """(Ŵ, grid) from GPTQ, or None (with a note) when its Cholesky fails."""
    try:
        return gptq(w, sigma, spec, percdamp=opts.percdamp, blocksize=opts.blocksize,
                    act_order=opts.act_order, static_groups=opts.static_groups,
                    damp_retries=opts.damp_retries, notes=notes, grid=grid)
    except CholeskyError as e:
        notes.append(f"GPTQ failed ({e}); fell back to QuantEase")
        return None


def solve_gptq(w, sigma, spec, opts: SolverOptions, notes: list[str], grid=None) -> SolveResult:
    done = _gptq(w, sigma, spec, opts, notes, grid)
    if done is None:
        return solve_quantease(w, sigma, spec, opts, notes, grid)
    w_hat, grid = done
    return _result(grid, w_hat)


def solve_gptq_quantease(w, sigma, spec, opts: SolverOptions, notes: list[str],
                         grid=None) -> SolveResult:
    """GPTQ's grid and rounded weights as the start, the original W as the target."""
    done = _gptq(w, sigma, spec, opts, notes, grid)
    if done is None:
        return solve_quantease(w, sigma, spec, opts, notes, grid)
    start, grid = done
    w_hat = quantease(w, damped(sigma, opts.qe_damp), grid, opts.sweeps, opts.relax,
                      opts.act_order, opts.blocksize, start=start)
    # relaxed sweeps may wander; never return worse than the GPTQ start
    if relative_error(w, w_hat, sigma) > relative_error(w, start, sigma):
        notes.append("QuantEase sweeps did not improve on GPTQ; kept GPTQ's weights")
        w_hat = start
    return _result(grid, w_hat)


def solve_quantease_outlier(w, sigma, spec, opts: SolverOptions, notes: list[str],
                            grid=None) -> SolveResult:
    if grid is not None:
        raise ConfigError("method='quantease_outlier' fits its own grid around the outliers and "
                          "takes no fixed grid; use rtn, gptq, quantease or gptq_quantease")
    w_hat, grid, h = quantease_outlier(
        w, damped(sigma, opts.qe_damp), spec, fraction=opts.outlier_fraction,
        structured=opts.outlier_structure == "structured", sweeps=opts.sweeps,
        relax=opts.relax, blocksize=opts.blocksize)
    notes.append(f"{int((h != 0).sum())} outliers ({opts.outlier_structure})")
    return _result(grid, w_hat, h.to_sparse_coo())


SOLVERS: dict[str, Callable[..., SolveResult]] = {
    "rtn": solve_rtn, "gptq": solve_gptq, "quantease": solve_quantease,
    "quantease_outlier": solve_quantease_outlier, "gptq_quantease": solve_gptq_quantease}
assert set(SOLVERS) == set(METHODS) - set(BLOCK_METHODS), "every layer-wise method needs a solver"


@torch.no_grad()
def solve(method: str, w: torch.Tensor, sigma: torch.Tensor, spec: QuantSpec,
          grid: Grid | None = None, **options) -> SolveResult:
    """Quantize weight `w` [N, K] for inputs with Gram matrix `sigma` [K, K] on `spec`'s grid.

    With `grid` (a `Grid` already fixed, e.g. a GGUF block type's scales quantized as the
    format stores them), the solver keeps that grid and only chooses the codes on it;
    `spec` then only names the bit width."""
    if method not in SOLVERS:
        raise ConfigError(f"method={method!r} has no solver; use one of {sorted(SOLVERS)}")
    if w.ndim != 2 or sigma.shape != (w.shape[1], w.shape[1]):
        raise ConfigError(f"solve needs W [N, K] and Σ [K, K]; got W {tuple(w.shape)}, "
                          f"Σ {tuple(sigma.shape)}")
    if grid is not None and tuple(grid.s.shape) != tuple(w.shape):
        raise ConfigError(f"the fixed grid is {tuple(grid.s.shape)} but W is {tuple(w.shape)}")
    opts = SolverOptions.from_dict(options)
    notes: list[str] = []
    t0 = time.perf_counter()
    res = SOLVERS[method](w.detach().float(), sigma.detach().float(), spec, opts, notes,
                          grid=grid)
    res.stats = {"method": method, "seconds": time.perf_counter() - t0, "notes": notes,
                 "rel_error": relative_error(w.float(), res.weight(), sigma)}
    return res


__all__ = ["SOLVERS", "SolveResult", "SolverOptions", "relative_error", "solve"]
