"""Differentiable quantized linear for block training (ABQ): smoothing, LWC, compensation.

`QLinear` replaces an `nn.Linear` inside a float copy of a decoder block. Its effective
float weight is the original weight with every learnable transform applied:

    W_eff = W * s_in[cols] / s_out[rows] + a bᵀ        bias_eff = bias / s_out

(`s_in`: the smoothing scale of a pair this linear consumes; `s_out`: of a pair whose
source it is; `a bᵀ`: down_proj's rank-1 compensation). The weight is quantized with
learnable clipping (LWC: ``sigmoid(u)`` and ``sigmoid(l)`` shrink the row/group max and
min) and straight-through rounding; the input is divided by the norm-pair scale and
fake-quantized per token at run time, exactly as the folded graph will do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LinearAnnotation, QuantSpec, sym_zero
from ..quantizer import _grouped, expand_qparam

MIN_SMOOTH = 1e-2  # |s| below this is clamped (as the reference does)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grid_params(x: torch.Tensor, qmax: int, symmetric: bool, group_size: int,
                hi_factor: torch.Tensor | None = None, lo_factor: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable min/max (scale, zero) along the last dim, optionally shrunk by factors
    in (0, 1); the same grid as `quantizer.compute_qparams` when no factor is given."""
    g = _grouped(x, group_size)
    if symmetric:
        amax = g.abs().amax(dim=-1)
        if hi_factor is not None:
            amax = amax * hi_factor
        scale = (2 * amax / qmax).clamp(min=1e-8)
        return scale, torch.full_like(scale, sym_zero(qmax))
    lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
    if hi_factor is not None:
        hi, lo = hi * hi_factor, lo * lo_factor
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = round_ste(-lo / scale).clamp(0, qmax)
    return scale, zero


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                   group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    s, z = expand_qparam(scale, k, group_size), expand_qparam(zero, k, group_size)
    return (round_ste(x / s + z).clamp(0, qmax) - z) * s


def dynamic_fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-token dynamic fake quantization with straight-through rounding."""
    scale, zero = grid_params(x, spec.qmax, spec.symmetric, spec.group_size)
    return fake_quant_ste(x, scale, zero, spec.qmax, spec.group_size)


class QLinear(nn.Module):
    def __init__(self, linear: nn.Linear, ann: LinearAnnotation, lwc_init: float = 4.0,
                 out_spec: QuantSpec | None = None):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.path, self.wspec, self.aspec, self.out_spec = ann.path, ann.weight, ann.act, out_spec
        n, k = self.weight.shape
        groups = 1 if not self.wspec.group_size else -(-k // self.wspec.group_size)
        self.u = nn.Parameter(torch.full((n, groups), float(lwc_init)))
        self.l = None if self.wspec.symmetric else nn.Parameter(torch.full((n, groups), float(lwc_init)))
        self.in_div: nn.Parameter | None = None  # norm-pair scale dividing the input
        self.cols: list[tuple[nn.Parameter, torch.Tensor | None]] = []  # (s, GQA index)
        self.rows: nn.Parameter | None = None  # scale of the pair this linear is the source of
        self.comp_a: nn.Parameter | None = None
        self.comp_b: nn.Parameter | None = None
        self.record = False
        self.last_out: torch.Tensor | None = None

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        for s, idx in self.cols:
            s = s.clamp(min=MIN_SMOOTH)
            w = w * (s if idx is None else s[idx])[None, :]
        if self.rows is not None:
            w = w / self.rows.clamp(min=MIN_SMOOTH)[:, None]
        if self.comp_a is not None:
            w = w + self.comp_a @ self.comp_b
        return w

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.rows is None:
            return self.bias
        return self.bias / self.rows.clamp(min=MIN_SMOOTH)

    def weight_grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.wspec
        return grid_params(w, spec.qmax, spec.symmetric, spec.group_size, torch.sigmoid(self.u),
                           None if self.l is None else torch.sigmoid(self.l))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_div is not None:
            x = x / self.in_div.clamp(min=MIN_SMOOTH)
        if self.aspec is not None:
            x = dynamic_fake_quant(x, self.aspec)
        w = self.effective_weight()
        scale, zero = self.weight_grid(w)
        y = F.linear(x, fake_quant_ste(w, scale, zero, self.wspec.qmax, self.wspec.group_size),
                     self.effective_bias())
        if self.out_spec is not None:
            y = dynamic_fake_quant(y, self.out_spec)
        if self.record:
            self.last_out = y
        return y

    @torch.no_grad()
    def final_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learnt (scale, zero) of the effective weight, as the graph stores them."""
        scale, zero = self.weight_grid(self.effective_weight())
        return scale.detach().clone(), zero.detach().clone()
