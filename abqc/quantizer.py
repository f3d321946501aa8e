"""Uniform quantizer maths, shared by the custom ops, the passes and the solvers.

One convention everywhere: codes are unsigned integers ``q in [0, qmax]`` and
``x_hat = scale * (q - zero)``. Quantization is along the last dimension: a weight
``[N, K]`` gets one (scale, zero) per row (per output channel) or per group of
`group_size` columns (``[N, ceil(K/G)]``); an activation ``[..., K]`` gets one per token.
Unsigned codes with a zero point are what the integer kernels consume
(``y = s_x s_w (acc - z_w Σx - z_x Σw + K z_x z_w)``).
"""
from __future__ import annotations

import torch

from .config import QuantSpec, sym_zero


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View `x` [..., K] as [..., G, group_size], zero-padding the last group."""
    if group_size <= 0:
        return x.unsqueeze(-2)
    k = x.shape[-1]
    pad = (-k) % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group_size)


def expand_qparam(p: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Broadcast a per-row ([..., 1]) or per-group ([..., G]) qparam to [..., K]."""
    if group_size <= 0:
        return p
    return p.repeat_interleave(group_size, dim=-1)[..., :k]


def compute_qparams(x: torch.Tensor, qmax: int, symmetric: bool, group_size: int = 0,
                    clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (RTN) scale and zero point along the last dim of `x`.

    Returns tensors of shape [..., 1] (per row/token) or [..., G] (per group), in x's dtype.
    Asymmetric grids always contain 0 (range widened to include it), as GPTQ does, except
    at 1 bit, where the two levels are the min and the max.
    `clip` (scalar or broadcastable tensor in (0, 1]) shrinks the range, for clipping search.
    """
    g = _grouped(x.float(), group_size)
    if symmetric:
        amax = g.abs().amax(dim=-1)
        if clip is not None:
            amax = amax * clip
        scale = 2 * amax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, sym_zero(qmax))
    elif qmax == 1:  # 1-bit asymmetric: the two levels are min and max (0 on the grid would
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # leave one useful level); zero is fractional
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = hi - lo
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = -lo / scale
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale.to(x.dtype), zero.to(x.dtype)


def _round(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
           group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float codes, expanded scale, expanded zero), all fp32."""
    k = x.shape[-1]
    s = expand_qparam(scale, k, group_size).float()
    z = expand_qparam(zero, k, group_size).float()
    return torch.round(x.float() / s + z).clamp_(0, qmax), s, z


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
             group_size: int = 0) -> torch.Tensor:
    """Integer codes in [0, qmax] (as uint8)."""
    return _round(x, scale, zero, qmax, group_size)[0].to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int = 0) -> torch.Tensor:
    """scale * (q - zero), in the scale's dtype."""
    k = q.shape[-1]
    s = expand_qparam(scale, k, group_size)
    z = expand_qparam(zero, k, group_size)
    return (q.to(s.dtype) - z) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                  group_size: int = 0) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype (no uint8 intermediate)."""
    q, s, z = _round(x, scale, zero, qmax, group_size)
    return ((q - z) * s).to(x.dtype)


def qparams_for(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_qparams` with the grid and granularity of `spec`."""
    return compute_qparams(x, spec.qmax, spec.symmetric, spec.group_size)


def rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes uint8, scale, zero) for weight `w` [N, K]."""
    scale, zero = qparams_for(w, spec)
    return quantize(w, scale, zero, spec.qmax, spec.group_size), scale, zero
