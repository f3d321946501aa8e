"""A synthetic layer for solver tests and benchmarks: correlated inputs, a few large channels."""
from __future__ import annotations

import torch


def synthetic_layer(n: int = 128, k: int = 192, t: int = 2048, outlier_channels: int = 4,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [n, k] and Σ = X Xᵀ / t for correlated inputs whose first channels are 20x larger."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    x[:, :outlier_channels] *= 20
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x.T @ x / t
