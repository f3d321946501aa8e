"""Outlier-aware QuantEase: ``W ≈ Ŵ + H`` with Ŵ on the grid and H sparse in full precision.

Alternates one coordinate-descent sweep on Ŵ (target W - H) with one iterative
hard-thresholding step on H: ``H <- top_k(H - η ∇)``, ``∇ = 2 (H + Ŵ - W) Σ``,
``η = 1 / (2 λ_max(Σ))``. Unstructured: top-k entries by magnitude; structured: the
top columns by L2 norm (whole input channels kept in float). H starts as the top-k of W,
and the grid is fitted on W with those entries removed, which is where the gain comes from.
"""
from __future__ import annotations

import torch

from ..config import QuantSpec
from .grid import Grid
from .quantease import cd_sweep, normalised_gram, rounds


def top_k(h: torch.Tensor, fraction: float, structured: bool) -> torch.Tensor:
    """Keep the largest `fraction` of entries (or of columns, by L2 norm) of `h`; zero the rest."""
    if structured:
        k = max(1, round(fraction * h.shape[1]))
        keep = torch.zeros(h.shape[1], dtype=torch.bool, device=h.device)
        keep[torch.topk(h.norm(dim=0), k).indices] = True
        return h * keep[None, :]
    k = max(1, round(fraction * h.numel()))
    flat = h.reshape(-1)
    out = torch.zeros_like(flat)
    idx = torch.topk(flat.abs(), k).indices
    out[idx] = flat[idx]
    return out.reshape(h.shape)


def quantease_outlier(w: torch.Tensor, sigma: torch.Tensor, spec: QuantSpec, *,
                      fraction: float = 0.01, structured: bool = False, sweeps: int = 30,
                      relax: bool = True, blocksize: int = 128) -> tuple[torch.Tensor, Grid, torch.Tensor]:
    """(Ŵ on the grid, the grid, dense H with at most the allowed nonzeros)."""
    w = w.float()
    sigma = sigma.float()
    h = top_k(w, fraction, structured)
    grid = Grid.fit(w - h, spec)
    n, _ = normalised_gram(sigma)
    lam = torch.linalg.eigvalsh(sigma.double())[-1].clamp(min=1e-12).float()
    what_t = (w - h).T.contiguous()
    best, best_err = None, float("inf")
    for i in range(sweeps):
        rounded = rounds(i, sweeps, relax)
        cd_sweep((w - h).T.contiguous(), what_t, n, grid, round_=rounded, blocksize=blocksize)
        # IHT step on H, with Ŵ fixed: gradient 2 (H + Ŵ - W) Σ, step 1 / (2 λ_max)
        resid = h + what_t.T - w
        h = top_k(h - resid @ sigma / lam, fraction, structured)
        if rounded:  # a valid (on-grid) state: keep the best, IHT steps are not monotone
            e = h + what_t.T - w
            err = float(torch.einsum("ij,jk,ik->", e, sigma, e))
            if err < best_err:
                best, best_err = (what_t.T.clone(), h.clone()), err
    return best[0].contiguous(), grid, best[1]
