"""A fixed quantization grid for one weight matrix, expanded per column.

Solvers move columns around and project them back onto the grid; keeping the
per-row/per-group scale and zero expanded to [N, K] makes "round column j" one line.
"""
from __future__ import annotations

import torch

from ..config import QuantSpec
from ..quantizer import expand_qparam, qparams_for


class Grid:
    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, qmax: int, group_size: int, k: int):
        self.scale, self.zero = scale.float(), zero.float()
        self.qmax, self.group_size = qmax, group_size
        self.s = expand_qparam(self.scale, k, group_size).expand(-1, k).contiguous()
        self.z = expand_qparam(self.zero, k, group_size).expand(-1, k).contiguous()

    @classmethod
    def fit(cls, w: torch.Tensor, spec: QuantSpec) -> "Grid":
        """Min/max grid of `spec` fitted on `w` [N, K]."""
        scale, zero = qparams_for(w.float(), spec)
        return cls(scale, zero, spec.qmax, spec.group_size, w.shape[1])

    def project(self, x: torch.Tensor, cols: slice | torch.Tensor | int) -> torch.Tensor:
        """Nearest grid value of `x`, whose columns are `cols` of the weight."""
        s, z = self.s[:, cols], self.z[:, cols]
        return s * (torch.round(x / s + z).clamp_(0, self.qmax) - z)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """uint8 codes of `w` (on or off the grid: nearest level)."""
        return torch.round(w / self.s + self.z).clamp_(0, self.qmax).to(torch.uint8)

    def permuted(self, perm: torch.Tensor) -> "Grid":
        """The same grid with columns in `perm` order (for act-order)."""
        g = object.__new__(Grid)
        g.scale, g.zero, g.qmax, g.group_size = self.scale, self.zero, self.qmax, self.group_size
        g.s, g.z = self.s[:, perm], self.z[:, perm]
        return g
