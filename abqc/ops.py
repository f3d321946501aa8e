"""The quantization ops of abqc's IR, as `torch.library` custom ops.

Being real operators (with fake implementations) is what lets a rewritten graph run at
any shape, re-export with `torch.export`, and save with `torch.export.save`.
Importing this module registers them under the `abqc` namespace:

- ``abqc::choose_qparams(x, qmax, symmetric, group_size) -> (scale, zero)``: dynamic
  per-token (or per-group) min/max qparams of an activation.
- ``abqc::quantize(x, scale, zero, qmax, group_size) -> uint8 codes``
- ``abqc::dequantize(q, scale, zero, group_size) -> float``
- ``abqc::fake_quant(x, scale, zero, qmax, group_size) -> float``: the two above, fused.
- ``abqc::add_outliers(w, indices, values) -> float``: adds a sparse full-precision H
  (QuantEase's outliers) to a dequantized weight, keeping H sparse in storage.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import quantizer as Q


def _qparam_shape(x: Tensor, group_size: int) -> list[int]:
    groups = 1 if group_size <= 0 else -(-x.shape[-1] // group_size)
    return [*x.shape[:-1], groups]


@torch.library.custom_op("abqc::choose_qparams", mutates_args=())
def choose_qparams(x: Tensor, qmax: int, symmetric: bool, group_size: int) -> tuple[Tensor, Tensor]:
    return Q.compute_qparams(x, qmax, symmetric, group_size)


@choose_qparams.register_fake
def _(x, qmax, symmetric, group_size):
    shape = _qparam_shape(x, group_size)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("abqc::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, zero: Tensor, qmax: int, group_size: int) -> Tensor:
    return Q.quantize(x, scale, zero, qmax, group_size)


@quantize.register_fake
def _(x, scale, zero, qmax, group_size):
    return torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op("abqc::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    return Q.dequantize(q, scale, zero, group_size)


@dequantize.register_fake
def _(q, scale, zero, group_size):
    return torch.empty_like(q, dtype=scale.dtype)


@torch.library.custom_op("abqc::fake_quant", mutates_args=())
def fake_quant(x: Tensor, scale: Tensor, zero: Tensor, qmax: int, group_size: int) -> Tensor:
    return Q.fake_quantize(x, scale, zero, qmax, group_size)


@fake_quant.register_fake
def _(x, scale, zero, qmax, group_size):
    return torch.empty_like(x)


@torch.library.custom_op("abqc::add_outliers", mutates_args=())
def add_outliers(w: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """w + H for a sparse full-precision H given as COO (indices [2, nnz], values [nnz])."""
    out = w.clone()
    out.index_put_((indices[0], indices[1]), values.to(w.dtype), accumulate=True)
    return out


@add_outliers.register_fake
def _(w, indices, values):
    return torch.empty_like(w)


OPS = torch.ops.abqc
