"""FakeQuantLinear: the fake-quant function of a packed linear, computed in torch the way
the kernels compute it, so that the two agree bit for bit.

A float32 fake-quant matmul (``F.linear`` on dequantized activations and weights) rounds
its partial sums in an order of its own; with quantized activations a one-ulp difference
can move the next layer's activation code across a rounding boundary, and over a few
dozen layers and tokens two implementations of the same W4A8 model drift apart (see
the README, "Exactness"). The integer kernels instead compute the product exactly and
round in the epilogue ``y = s_x Σ_g s_w (acc - z_w Σx - z_x Σw + K z_x z_w)`` (float64,
then float32). This module does the same: activation codes on the same grid, the exact
integer accumulator (a float64 matmul of integers below 2^53 is exact), and the epilogue
as every integer kernel evaluates it (`abqc.codegen.compute.group_term`): the same float64
operations in the same order, each product rounded on its own (the kernels fence their
products against FMA contraction; eager torch never fuses), groups summed 0, 1, ... So the
two are equal by construction, on any x86-64 CPU and whichever integer formulation or
schedule the QuantLinear runs. (With integer zero points every product and sum before
``s_w *`` is an exact float64, so even the order could not matter.)

Not bit-identical: ``unpack`` (float activations in, float32 sums in the kernel's own
order) and the weight-only formats, which get the float64 product rounded once; the
kernels approach it but need not equal it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..codegen.kernel import quantize_activations
from .hf_model import copy_replacing
from .qlinear import QuantLinear, _fake_quant_tokens, _outlier_matrix


class FakeQuantLinear(nn.Module):
    """The function of a `QuantLinear` (sharing its buffers), run as fake quantization."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.fmt = q.fmt
        self.in_features, self.out_features = q.in_features, q.out_features
        # the packed buffers, shared and not copied; outside the module tree, so that the
        # tree holds no kernel-backed module
        self.__dict__["qlinear"] = q

    def _weight_terms(self):
        """Codes as float64 [N, K], per-group bounds, Σw per group and (weight-only formats)
        the dequantized float64 weight, cached per packed weight."""
        q = self.qlinear
        key = (q.weight_packed.data_ptr(), q.weight_scale.data_ptr(), q.weight_zero_point.data_ptr())
        st = self.__dict__.get("_w")
        if st is None or st[0] != key:
            codes = q.codes().double()
            bounds, start = [], 0
            for length in q.group_k.tolist():
                stop = min(start + int(round(length)), self.fmt.k)
                bounds.append((start, stop))
                start = stop
            sumw = torch.stack([codes[:, a:b].sum(1) for a, b in bounds], 1)
            w = q.dequantized_weight().double().contiguous() if self.fmt.weight_only else None
            st = (key, codes, bounds, sumw, w)
            self.__dict__["_w"] = st
        return st[1:]

    def forward(self, x: Tensor) -> Tensor:
        fmt, q = self.fmt, self.qlinear
        x2 = x.reshape(-1, fmt.k).float()
        if fmt.weight_only:
            y = (x2.double() @ self._weight_terms()[3].T).float()
            xa = x2
        else:
            y = self._integer_product(x2)
            xa = _fake_quant_tokens(x2, fmt)
        if q.outlier_indices is not None and q.outlier_indices.numel():
            y += torch.sparse.mm(_outlier_matrix(q.outlier_indices, q.outlier_values, fmt), xa.T).T
        if q.bias is not None:
            y += q.bias.float()
        return y.view(*x.shape[:-1], fmt.n).to(x.dtype)

    def _integer_product(self, x2: Tensor) -> Tensor:
        """The kernels' result: exact Σ xq wq per group, then their float64 epilogue, in
        `group_term`'s order: ``s_w (((acc - z_w Σx) - z_x Σw) + (K z_x) z_w)`` per group,
        summed from group 0, times ``s_x``, to float32."""
        fmt, q = self.fmt, self.qlinear
        wc, bounds, sumw, _ = self._weight_terms()
        xc, sx, zx = quantize_activations(x2, fmt.abits, fmt.act_symmetric)
        xc = xc.double()
        sx, zx = sx.double()[:, None], zx.double()[:, None]
        sw, zw = q.weight_scale.double(), q.weight_zero_point.double()
        kg = q.group_k.double()
        y = None
        for g, (a, b) in enumerate(bounds):
            acc = xc[:, a:b] @ wc[:, a:b].T  # integers: exact in float64
            sumx = xc[:, a:b].sum(1, keepdim=True)
            term = sw[:, g] * (((acc - zw[:, g] * sumx) - zx * sumw[:, g]) + (kg[g] * zx) * zw[:, g])
            y = term if y is None else y + term
        return (sx * y).float()

    def extra_repr(self) -> str:
        return f"{self.fmt} (fake quant, as the kernels round)"


def fake_quant_model(model: nn.Module) -> nn.Module:
    """A copy of `model` (sharing every tensor) with each `QuantLinear` replaced by its
    `FakeQuantLinear`: the same quantized model, computed by torch instead of the kernels."""
    return copy_replacing(model, {m: FakeQuantLinear(m) for m in model.modules()
                                  if isinstance(m, QuantLinear)})
