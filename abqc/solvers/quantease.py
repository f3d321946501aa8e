"""QuantEase: cyclic coordinate descent on ``tr((W-Ŵ) Σ (W-Ŵ)ᵀ)``, no inverse, no Cholesky.

For input column j, with the other columns fixed, the best column is
``β_j = Ŵ_j + ((W-Ŵ) Σ)_j / Σ_jj``; every row is an independent 1-D quadratic with the
same curvature Σ_jj, so rounding β_j onto the (fixed) grid is the exact coordinate
minimiser. A rounded sweep therefore never increases the error.

Vectorised sweep: keep ``R = (W-Ŵ) N`` with ``N = Σ / diag Σ`` (column-wise), recomputed
by one matmul per sweep; inside a block of columns each update corrects the block's
remaining columns (rank 1), and the later columns get one matmul per block (lazy
updates, as GPTQ does). Work is done on transposed copies so a column is a contiguous row.
"""
from __future__ import annotations

import torch

from . import cd_triton
from .grid import Grid


def damped(sigma: torch.Tensor, fraction: float) -> torch.Tensor:
    """Σ + fraction * mean(diag Σ) * I: a ridge towards plain rounding, which keeps the
    solution from fitting directions the calibration text excites but other text does not."""
    if fraction <= 0:
        return sigma
    d = torch.diagonal(sigma)
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    return sigma + fraction * d[d > 0].mean() * eye


def normalised_gram(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N = Σ / diag Σ column-wise, dead-column mask). Dead columns (Σ_jj = 0) get N_:,j = 0."""
    sigma = sigma.float()
    d = torch.diagonal(sigma).clone()
    dead = d <= 0
    d[dead] = 1.0
    n = sigma / d[None, :]
    n[:, dead] = 0.0
    n[dead, :] = 0.0
    return n, dead


def rounds(sweep: int, sweeps: int, relax: bool) -> bool:
    """Whether sweep `sweep` rounds. The reference schedule (``relax``): sweeps 1, 4, 7, ...
    skip rounding, the last four always round; without it every sweep rounds."""
    return not (relax and sweep % 3 == 1 and sweep < sweeps - 4)


def cd_sweep(target_t: torch.Tensor, what_t: torch.Tensor, n: torch.Tensor, grid: Grid,
             round_: bool, blocksize: int = 128) -> None:
    """One cyclic sweep over all columns, in place on ``what_t`` (Ŵᵀ, [K, N]).

    ``target_t`` is the target weight transposed; ``grid`` is already in this column order
    (its ``s``/``z`` are [N, K]).
    """
    k = what_t.shape[0]
    r = n.T @ (target_t - what_t)  # Rᵀ = Nᵀ (W - Ŵ)ᵀ, [K, N]
    st, zt = grid.s.T, grid.z.T
    fused = cd_triton.available(what_t)
    if fused:  # one kernel per block of columns (see cd_triton)
        r, n, st, zt = r.contiguous(), n.contiguous(), st.contiguous(), zt.contiguous()
    for a in range(0, k, blocksize):
        b = min(a + blocksize, k)
        if fused:
            delta = cd_triton.cd_block(what_t, r, n, st, zt, grid.qmax, a, b, round_)
            if b < k:
                r[b:].addmm_(n[a:b, b:].T, delta, alpha=-1.0)
            continue
        delta = torch.empty(b - a, what_t.shape[1], dtype=what_t.dtype, device=what_t.device)
        for j in range(a, b):
            beta = what_t[j] + r[j]
            if round_:
                s, z = st[j], zt[j]
                beta = s * (torch.round(beta / s + z).clamp_(0, grid.qmax) - z)
            dj = beta - what_t[j]
            what_t[j] = beta
            delta[j - a] = dj
            if j + 1 < b:
                r[j + 1:b].addr_(n[j, j + 1:b], dj, alpha=-1.0)
        if b < k:
            r[b:].addmm_(n[a:b, b:].T, delta, alpha=-1.0)


def quantease(w: torch.Tensor, sigma: torch.Tensor, grid: Grid, sweeps: int = 30,
              relax: bool = True, act_order: bool = False, blocksize: int = 128,
              start: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ on `grid` minimising ``tr((W-Ŵ) Σ (W-Ŵ)ᵀ)``; starts from `start` (default: W itself)."""
    w = w.float()
    what = (w if start is None else start).float().clone()
    n, _ = normalised_gram(sigma)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(sigma), descending=True)
        w, what, n, grid = w[:, perm], what[:, perm], n[perm][:, perm], grid.permuted(perm)
    target_t = w.T.contiguous()
    what_t = what.T.contiguous()
    n = n.contiguous()
    for i in range(sweeps):
        cd_sweep(target_t, what_t, n, grid, round_=rounds(i, sweeps, relax), blocksize=blocksize)
    what = what_t.T
    if perm is not None:
        what = what[:, torch.argsort(perm)]
    return what.contiguous()
