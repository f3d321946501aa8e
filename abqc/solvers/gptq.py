"""GPTQ: quantize columns in order, spreading each column's error over the columns not yet
quantized through the Cholesky factor of Σ⁻¹ (blocks of 128, lazy batch updates).

Damping 0.01·mean(diag Σ), raised x10 on each Cholesky failure; when it still fails,
`CholeskyError` tells the dispatcher to fall back to QuantEase (which needs no inverse).
"""
from __future__ import annotations

import torch

from ..config import QuantSpec
from ..quantizer import compute_qparams
from .grid import Grid


class CholeskyError(RuntimeError):
    """Σ + damping is not positive definite even after raising the damping."""


def inverse_cholesky(sigma: torch.Tensor, percdamp: float, retries: int,
                     notes: list[str]) -> torch.Tensor:
    """Upper Cholesky factor of (Σ + λI)⁻¹, raising λ x10 up to `retries` times."""
    k = sigma.shape[0]
    damp = percdamp * torch.diagonal(sigma).mean()
    eye = torch.eye(k, dtype=sigma.dtype, device=sigma.device)
    for attempt in range(retries + 1):
        l, info = torch.linalg.cholesky_ex(sigma + damp * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0 and torch.isfinite(u).all():
                if attempt:
                    notes.append(f"Cholesky needed damping x{10 ** attempt}")
                return u
        damp = damp * 10
    raise CholeskyError(f"Σ is not positive definite after {retries} damping increases")


def gptq(w: torch.Tensor, sigma: torch.Tensor, spec: QuantSpec, *, percdamp: float = 0.01,
         blocksize: int = 128, act_order: bool = False, static_groups: bool = False,
         damp_retries: int = 3, notes: list[str] | None = None,
         grid: Grid | None = None) -> tuple[torch.Tensor, Grid]:
    """(Ŵ on the returned grid, the grid). Columns dead in Σ are plain-rounded.

    `grid`: a grid fixed beforehand (an export format's own scales); GPTQ then only chooses
    the codes on it, its error feedback unchanged."""
    notes = notes if notes is not None else []
    w0 = w.float()
    w = w0.clone()
    h = sigma.float().clone()
    nrow, k = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = spec.group_size if grid is None else grid.group_size
    qmax = spec.qmax if grid is None else grid.qmax
    if gs and act_order and not static_groups and grid is None:
        static_groups = True
        notes.append("act_order with groups uses static groups (groups stay contiguous)")
    fixed = grid if grid is not None else (Grid.fit(w0, spec) if (not gs or static_groups) else None)

    perm = torch.arange(k, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_cholesky(h, percdamp, damp_retries, notes)

    scale = torch.empty(nrow, (k + gs - 1) // gs if gs else 1, device=w.device)
    zero = torch.empty_like(scale)
    q_all = torch.zeros_like(w)
    s_col = z_col = None
    order = perm.tolist()  # column ids on the host: no device sync per column
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            if fixed is not None:
                s_col, z_col = fixed.s[:, col], fixed.z[:, col]
            elif col % gs == 0:  # dynamic groups: fit on the current (error-updated) weights
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gs]
                s, z = compute_qparams(cur, qmax, spec.symmetric)
                scale[:, col // gs], zero[:, col // gs] = s[:, 0], z[:, 0]
                s_col, z_col = s[:, 0], z[:, 0]
            x = w1[:, i]
            q = s_col * (torch.round(x / s_col + z_col).clamp_(0, qmax) - z_col)
            q_all[:, i1 + i] = q
            e = (x - q) / u1[i, i]
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)
            err1[:, i] = e
        if i2 < k:
            w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)

    q_all = q_all[:, torch.argsort(perm)]
    grid = fixed if fixed is not None else Grid(scale, zero, qmax, gs, k)
    if dead.any():
        q_all[:, dead] = grid.project(w0[:, dead], dead)
        notes.append(f"{int(dead.sum())} dead input columns rounded")
    return q_all, grid
