"""Running a built kernel on torch tensors: weight packing (offline), activation
quantization + packing (online), and the call itself through DLPack (no copies)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import tvm

from ..quantizer import compute_qparams, dequantize
from . import packing as P
from .actquant import actcodes_kernel
from .compute import WO_FORMULATIONS, KernelShape, packing_of
from .unpack import UNPACK_DEFAULT, pack_codes
from .vnni import pack_vnni, vnni_kp


def _dl(t: torch.Tensor):
    """A TVM view of `t` (no copy), or of an aligned copy where `t` is not 64-byte aligned
    (TVM requires it; tensors mapped from files can be misaligned)."""
    t = t.contiguous()
    if t.data_ptr() % 64:
        t = t.clone()
    return tvm.runtime.from_dlpack(t)


@dataclass
class PackedWeight:
    """A weight as one formulation reads it, with its grid and per-group code sums."""

    formulation: str
    shape: KernelShape
    data: torch.Tensor  # int64 bit planes [wbits, N, KW], uint8 table indices [wbits, N, KP/4],
    #                     int32 code words [words, N] (unpack) or uint8 blocks [NP, KB, 64] (vnni)
    scale: torch.Tensor  # float32 [N, G]
    zero: torch.Tensor  # float32 [N, G]
    sumw: torch.Tensor  # int32 [N, G]
    kg: torch.Tensor  # float32 [G], real K per group


def pack_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: KernelShape,
                formulation: str) -> PackedWeight:
    """Pack uint8 codes [N, K] with their (scale, zero) [N, 1] or [N, G] for `formulation`."""
    if codes.shape != (shape.n, shape.k):
        raise ValueError(f"codes {tuple(codes.shape)} do not match the kernel shape "
                         f"N={shape.n}, K={shape.k}")
    if int(codes.max()) >= 1 << shape.wbits:
        raise ValueError(f"codes reach {int(codes.max())}, beyond {shape.wbits}-bit")
    g = shape.groups
    layout = packing_of(formulation)
    if layout == "bitplanes":
        data = P.pack_bitplanes(codes, shape.wbits, shape.group_size)
    elif layout == "codes":
        data = pack_codes(codes, shape.wbits, shape.kp)
    elif layout == "vnni":
        data = pack_vnni(codes, shape.wbits)
    else:
        data = P.pack_nibbles(codes, shape.wbits, shape.group_size)
    return PackedWeight(formulation, shape, data,
                        scale.float().expand(shape.n, g).contiguous(),
                        zero.float().expand(shape.n, g).contiguous(),
                        P.group_sums(codes, shape.group_size, shape.kp),
                        torch.tensor(shape.group_lengths(), dtype=torch.float32))


def quantize_activations(x: torch.Tensor, bits: int, symmetric: bool = False):
    """Per-token (codes uint8 [M, K], scale [M], zero [M]) on the same grid as the fake-quant ops."""
    qmax = (1 << bits) - 1
    s, z = compute_qparams(x.float(), qmax, symmetric)
    codes = torch.round(x.float() / s + z).clamp_(0, qmax).to(torch.uint8)
    return codes, s.view(-1).contiguous(), z.view(-1).contiguous()


class Kernel:
    """A compiled kernel for one (formulation, shape) with its schedule."""

    def __init__(self, executable, formulation: str, shape: KernelShape, params: dict[str, Any],
                 key: str = ""):
        self.ex, self.formulation, self.shape, self.params, self.key = \
            executable, formulation, shape, dict(params), key
        mod = getattr(executable, "mod", executable)  # an Executable or a loaded runtime Module
        has = mod.implements_function
        self._main = executable["main"] if has("main") else None
        self._acc = executable["acc"] if has("acc") else None

    def main_unpack(self, *args) -> None:
        """``main`` of an unpack kernel on prepared TVM tensors (the runtime's hot path)."""
        self._main(*args)

    @property
    def weight_only(self) -> bool:
        """Whether ``main`` takes float activations (and the weight-only epilogue)."""
        return self.formulation in WO_FORMULATIONS or self.formulation == "unpack"

    @property
    def m_tile(self) -> int:
        """Rows ``main`` processes per register block (M is padded to a multiple)."""
        return {**UNPACK_DEFAULT, **self.params}["m_tile"] if self.formulation == "unpack" else 1

    def activation_inputs(self, x: torch.Tensor, act_symmetric: bool):
        """What ``main`` reads for activations x [M, K]: (packed data, per-token extras)."""
        s = self.shape
        if self.formulation == "unpack" and s.abits != 16:
            codes, sx, zx = quantize_activations(x, s.abits, act_symmetric)
            x = (codes.float() - zx[:, None]) * sx[:, None]  # the grid's values, as fake quant
        if self.weight_only:
            xf = x.float()
            mp = -(-x.shape[0] // self.m_tile) * self.m_tile
            if mp > x.shape[0]:
                xf = torch.nn.functional.pad(xf, (0, 0, 0, mp - x.shape[0]))
            xp = torch.nn.functional.pad(xf, (0, s.kp - s.k)) if s.kp > s.k else xf
            xs = xp.view(xp.shape[0], s.groups, -1).sum(-1).contiguous()
            data = xp.contiguous() if self.formulation in ("wo_bitserial", "unpack") else \
                P.lookup_tables(xp, s.kp, torch.float32)
            return data, (xs,)
        if self.formulation == "vnni":  # one TVM kernel: codes, grid and row sums
            m, kp = x.shape[0], vnni_kp(s.k, s.wbits)
            data = torch.empty(m, kp, dtype=torch.uint8)
            sx, zx, sumx = torch.empty(m), torch.empty(m), torch.empty(m, 1, dtype=torch.int32)
            actcodes_kernel(s.k, kp, s.abits, act_symmetric)(
                _dl(x.float()), _dl(data), _dl(sx), _dl(zx), _dl(sumx))
            return data, (sx, zx, sumx)
        codes, sx, zx = quantize_activations(x, s.abits, act_symmetric)
        if self.formulation == "bitserial":
            data = P.pack_bitplanes(codes, s.abits, s.group_size)
        else:
            data = P.lookup_tables(codes, s.kp)
        return data, (sx, zx, P.group_sums(codes, s.group_size, s.kp))

    def __call__(self, x: torch.Tensor, w: PackedWeight, act_symmetric: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """y [M, N] float32 for float activations x [M, K]."""
        if w.formulation != self.formulation or w.shape != self.shape:
            raise ValueError(f"weight packed for {w.formulation} {w.shape} given to a "
                             f"{self.formulation} {self.shape} kernel")
        x = x.reshape(-1, self.shape.k)
        data, act = self.activation_inputs(x, act_symmetric)
        y = out if out is not None else torch.empty(x.shape[0], self.shape.n, dtype=torch.float32)
        if self.formulation == "unpack":
            mp = data.shape[0]
            yp = y if mp == x.shape[0] else torch.empty(mp, self.shape.n, dtype=torch.float32)
            self._main(_dl(data), _dl(w.data), _dl(w.scale), _dl(w.zero), _dl(act[0]), _dl(yp),
                       mp // self.m_tile)
            if yp is not y:
                y.copy_(yp[: x.shape[0]])
        elif self.weight_only:
            self._main(_dl(data), _dl(w.data), _dl(w.scale), _dl(w.zero), _dl(act[0]), _dl(y))
        else:
            sx, zx, sumx = act
            self._main(_dl(data), _dl(w.data), _dl(sx), _dl(zx), _dl(sumx), _dl(w.scale),
                       _dl(w.zero), _dl(w.sumw), _dl(w.kg), _dl(y))
        return y

    def accumulate(self, act_data: torch.Tensor, w: PackedWeight, m: int) -> torch.Tensor:
        """The raw accumulator [M, N, G] (integer kernels: int32; weight-only: float32)."""
        dtype = torch.float32 if self.weight_only else torch.int32
        if self.formulation == "unpack":  # rows padded to whole register blocks
            acc = torch.empty(act_data.shape[0], self.shape.n, self.shape.groups, dtype=dtype)
            self._acc(_dl(act_data), _dl(w.data), _dl(acc), act_data.shape[0] // self.m_tile)
            return acc[:m]
        acc = torch.empty(m, self.shape.n, self.shape.groups, dtype=dtype)
        self._acc(_dl(act_data), _dl(w.data), _dl(acc))
        return acc


def reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              shape: KernelShape, act_symmetric: bool = False) -> torch.Tensor:
    """The fake-quant result the kernels must reproduce, in float64."""
    w = dequantize(codes, scale.double(), zero.double(), shape.group_size)
    if shape.abits == 16:
        return x.double() @ w.T
    c, s, z = quantize_activations(x, shape.abits, act_symmetric)
    return ((c.double() - z.double()[:, None]) * s.double()[:, None]) @ w.T


__all__ = ["Kernel", "PackedWeight", "pack_weight", "quantize_activations", "reference"]
