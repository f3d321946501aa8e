"""What a solver returns: the weight as codes on a grid, plus optional sparse outliers."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quantizer import dequantize


@dataclass
class SolveResult:
    """``W ≈ scale * (codes - zero) + outliers``; codes uint8 [N, K], qparams [N, 1] or [N, G]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int = 0
    outliers: torch.Tensor | None = None  # sparse COO [N, K], fp32, kept beside the codes
    stats: dict = field(default_factory=dict)  # rel_error, seconds, method, notes

    def to(self, device) -> "SolveResult":
        """The same result with its tensors on `device` (stats are shared)."""
        def move(t):
            return None if t is None else t.to(device)
        return SolveResult(move(self.codes), move(self.scale), move(self.zero), self.group_size,
                           move(self.outliers), self.stats)

    def weight(self) -> torch.Tensor:
        """The dense fp32 weight this result stands for."""
        w = dequantize(self.codes, self.scale.float(), self.zero.float(), self.group_size)
        if self.outliers is not None:
            w = w + self.outliers.to_dense()
        return w


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    """``||(W - Ŵ) X||² / ||W X||²`` from Σ = X Xᵀ (any positive scaling of Σ)."""
    e = (w - w_hat).double()
    s = sigma.double()
    den = torch.einsum("ij,jk,ik->", w.double(), s, w.double())
    num = torch.einsum("ij,jk,ik->", e, s, e)
    return float(num / den) if den > 0 else float(num)
