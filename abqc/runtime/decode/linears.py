"""The short way into a packed linear, for the decode step.

A `QuantLinear` called as a module costs ~30 µs of Python per call (module dispatch, shape
checks, buffer allocation, DLPack views): at 211 linears a token that is most of a decode
step. `StepLinear` makes everything a one-token call needs once (the activation-code buffers
and the weight's TVM views) and then runs a call as two TVM function calls on the caller's
float32 activations and a persistent output buffer; TVM takes torch tensors directly
(no DLPack object per call). The result is the kernel's own, so it equals the module's
output bit for bit: the same two kernels run on the same inputs.

Everything else (several tokens, weight-only and grouped formats, sparse outliers, float
linears such as a float ``lm_head``) goes through the module itself.
"""
from __future__ import annotations

import torch
import tvm
from torch import Tensor, nn

from ...codegen.actquant import actcodes_kernel
from ...codegen.vnni import vnni_kp
from .. import kernels
from ..qlinear import QuantLinear


class StepLinear:
    """One linear of the step: ``y = step_linear(x)`` for float32 x [M, K] (contiguous)."""

    __slots__ = ("module", "n", "k", "_one", "_bias", "_y")

    def __init__(self, module: nn.Module):
        self.module = module
        self.k = module.in_features
        self.n = module.out_features
        self._one = None
        self._bias = None
        self._y = None
        if isinstance(module, QuantLinear) and self._has_fast_path(module):
            self._prepare(module)

    @staticmethod
    def _has_fast_path(mod: QuantLinear) -> bool:
        outl = mod.outlier_indices
        return (mod.fmt.formulation == "vnni" and (outl is None or not outl.numel())
                and not mod.weight_packed.is_cuda)

    def _prepare(self, mod: QuantLinear) -> None:
        fmt = mod.fmt
        kern = kernels.kernel(fmt, 1, mod.spec)
        kp = vnni_kp(fmt.k, fmt.wbits)
        xc = torch.empty(1, kp, dtype=torch.uint8)
        sx, zx = torch.empty(1), torch.empty(1)
        sumx = torch.empty(1, 1, dtype=torch.int32)
        self._y = torch.empty(1, fmt.n)
        mod.realign()  # TVM reads the weight in place: 64-byte aligned
        w = (mod.weight_packed, mod.weight_scale, mod.weight_zero_point, mod.weight_sum,
             mod.group_k)
        aq = actcodes_kernel(fmt.k, kp, fmt.abits, fmt.act_symmetric)
        view = tvm.runtime.from_dlpack  # made once: a prepared view passes in ~0.1 µs
        self._one = (aq, kern._main, tuple(view(t) for t in (xc, sx, zx, sumx)),
                     tuple(view(t) for t in w), view(self._y))
        self._bias = mod.bias

    def __call__(self, x: Tensor) -> Tensor:
        """y [M, N] float32. With one token on the fast path, y is a buffer this object
        reuses on its next call: use it (or copy it) before then."""
        one = self._one
        if one is not None and x.shape[0] == 1 and x.data_ptr() % 64 == 0:
            aq, main, (xc, sx, zx, sumx), (w, sw, zw, sumw, kg), yv = one
            aq(x, xc, sx, zx, sumx)
            main(xc, w, sx, zx, sumx, sw, zw, sumw, kg, yv)
            y = self._y
            if self._bias is not None:
                y += self._bias
            return y
        y = self.module(x)
        return y if y.dtype == torch.float32 else y.float()
