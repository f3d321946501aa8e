"""``abqc::qlinear`` and `QuantLinear`: a linear layer that runs on a generated kernel.

The op takes float activations, quantizes and packs them per token (as the fake-quant
graph's ``choose_qparams`` + ``quantize`` do), calls the compiled kernel on the packed
weight through DLPack, and adds the bias and any sparse full-precision outliers. Being
a custom op with a fake implementation, it can sit in an exported graph (the lowered
IR) and in an eager module tree (generation) alike.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..codegen import packing as P
from ..codegen.compute import packing_of
from ..codegen.actquant import actcodes_kernel, actquant_kernel
from ..codegen.kernel import PackedWeight, _dl, pack_weight
from ..codegen.unpack import code_words, unpack_codes
from ..codegen.vnni import packed_shape, unpack_vnni, vnni_kp
from ..quantizer import compute_qparams
from . import kernels
from .format import QuantFormat

_formats: dict[str, QuantFormat] = {}


def _format(spec: str) -> QuantFormat:
    fmt = _formats.get(spec)
    if fmt is None:
        fmt = _formats[spec] = QuantFormat.parse(spec)
    return fmt


def qlinear_impl(x: Tensor, weight_packed: Tensor, weight_scale: Tensor, weight_zero_point: Tensor,
                 weight_sum: Tensor, group_k: Tensor, bias: Optional[Tensor],
                 outlier_indices: Optional[Tensor], outlier_values: Optional[Tensor],
                 spec: str) -> Tensor:
    """What ``abqc::qlinear`` computes (called directly by eager modules: no dispatcher)."""
    fmt = _format(spec)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, fmt.k).float()
    m = x2.shape[0]
    y = torch.empty(m, fmt.n, dtype=torch.float32)
    xa = None
    if m:
        kern = kernels.kernel(fmt, m, spec)
        if fmt.formulation == "unpack":
            y, xa = _run_unpack(kern, fmt, x2, weight_packed, weight_scale, weight_zero_point)
        else:
            w = PackedWeight(fmt.formulation, fmt.shape, weight_packed, weight_scale,
                             weight_zero_point, weight_sum, group_k)
            kern(x2, w, fmt.act_symmetric, out=y)
        if outlier_indices is not None and outlier_indices.numel():
            if xa is None:
                xa = x2 if fmt.weight_only else _fake_quant_tokens(x2, fmt)
            y += torch.sparse.mm(_outlier_matrix(outlier_indices, outlier_values, fmt), xa.T).T
    if bias is not None:
        y += bias.float()
    return y.view(*lead, fmt.n).to(x.dtype)


qlinear = torch.library.custom_op("abqc::qlinear", qlinear_impl, mutates_args=())


def _run_unpack(kern, fmt: QuantFormat, x2: Tensor, packed: Tensor, scale: Tensor, zero: Tensor):
    """Activation quantization (a TVM kernel) then the unpack kernel; (y [M, N], x̂ [M, K])."""
    s = fmt.shape
    mt = kern.m_tile
    m = x2.shape[0]
    mp = -(-m // mt) * mt
    xq = torch.empty(mp, s.kp)
    xs = torch.empty(mp, s.groups)
    y = torch.empty(mp, fmt.n)
    aq = actquant_kernel(fmt.k, s.kp, s.groups, fmt.abits, fmt.act_symmetric, mt)
    aq(_dl(x2), _dl(xq), _dl(xs), mp // mt)
    kern.main_unpack(_dl(xq), _dl(packed), _dl(scale), _dl(zero), _dl(xs), _dl(y), mp // mt)
    return y[:m], xq[:m, :fmt.k]


@qlinear.register_fake
def _(x, weight_packed, weight_scale, weight_zero_point, weight_sum, group_k, bias,
      outlier_indices, outlier_values, spec):
    return x.new_empty(*x.shape[:-1], _format(spec).n)


def _outlier_matrix(indices: Tensor, values: Tensor, fmt: QuantFormat) -> Tensor:
    """The sparse full-precision outliers H [N, K] beside the packed weight."""
    return torch.sparse_coo_tensor(indices, values, (fmt.n, fmt.k), check_invariants=False,
                                   is_coalesced=True)


def _fake_quant_tokens(x: Tensor, fmt: QuantFormat) -> Tensor:
    qmax = (1 << fmt.abits) - 1
    s, z = compute_qparams(x, qmax, fmt.act_symmetric)
    return (torch.round(x / s + z).clamp_(0, qmax) - z) * s


def _tracing(x: Tensor) -> bool:
    """Whether export / compile / fx tracing is running (they must see the op)."""
    if type(x) is not Tensor:  # a plain tensor cannot be fake: skip the import (hot path)
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(x, FakeTensor):
            return True
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.fx._symbolic_trace.is_fx_tracing())


class QuantLinear(nn.Module):
    """Drop-in for `nn.Linear` holding a packed weight; ``forward`` calls ``abqc::qlinear``.

    Buffers (what is saved): ``weight_packed``, ``weight_scale``, ``weight_zero_point``,
    ``weight_sum``, ``group_k`` (real K per group), and optionally ``bias``, ``outlier_indices``, ``outlier_values``.
    """

    def __init__(self, fmt: QuantFormat, bias: bool = False, outliers: int = 0):
        super().__init__()
        self.fmt = fmt
        self.spec = str(fmt)
        self.in_features, self.out_features = fmt.k, fmt.n
        s = fmt.shape
        g = s.groups
        layout = packing_of(fmt.formulation)
        if layout == "bitplanes":
            packed = torch.zeros(fmt.wbits, fmt.n, s.kp // P.WORD, dtype=torch.int64)
        elif layout == "codes":
            packed = torch.zeros(code_words(s.kp, fmt.wbits), fmt.n, dtype=torch.int32)
        elif layout == "vnni":
            packed = torch.zeros(packed_shape(fmt.n, fmt.k, fmt.wbits), dtype=torch.uint8)
        else:
            packed = torch.zeros(fmt.wbits, fmt.n, s.kp // P.TABLE_GROUP, dtype=torch.uint8)
        # dtypes are the kernels' (explicit: from_pretrained(dtype=...) builds modules under
        # another default dtype); `_apply` keeps them through .to(dtype) / .half() / ...
        f32 = torch.float32
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", torch.ones(fmt.n, g, dtype=f32))
        self.register_buffer("weight_zero_point", torch.zeros(fmt.n, g, dtype=f32))
        self.register_buffer("weight_sum", torch.zeros(fmt.n, g, dtype=torch.int32))
        self.register_buffer("group_k", torch.tensor(s.group_lengths(), dtype=f32))  # saved: no meta-init gaps
        self.register_buffer("bias", torch.zeros(fmt.n, dtype=f32) if bias else None)
        self.register_buffer("outlier_indices",
                             torch.zeros(2, outliers, dtype=torch.int64) if outliers else None)
        self.register_buffer("outlier_values", torch.zeros(outliers, dtype=f32) if outliers else None)

    @classmethod
    def from_codes(cls, fmt: QuantFormat, codes: Tensor, scale: Tensor, zero: Tensor,
                   bias: Tensor | None = None, outliers: Tensor | None = None) -> "QuantLinear":
        """Pack uint8 codes [N, K] with their grid ([N, 1] or [N, G]) for `fmt`'s kernel."""
        pw = pack_weight(codes, scale, zero, fmt.shape, fmt.formulation)
        nnz = 0 if outliers is None else int(outliers._nnz())
        mod = cls(fmt, bias=bias is not None, outliers=nnz)
        mod.weight_packed = pw.data
        mod.weight_scale, mod.weight_zero_point, mod.weight_sum = pw.scale, pw.zero, pw.sumw
        if bias is not None:
            mod.bias = bias.detach().float().clone()
        if nnz:
            mod.outlier_indices = outliers.indices().clone()
            mod.outlier_values = outliers.values().float().clone()
        return mod

    def _apply(self, fn, recurse=True):
        """Devices move, dtypes stay: every buffer is in the dtype its kernel takes (packed
        ints, float32 grids and bias), whatever ``.to(dtype)``, ``.half()``, ``.bfloat16()``
        or transformers' loading casts; activations are cast at the kernel boundary instead."""
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            new = fn(buf)
            if new.dtype != buf.dtype:  # re-derive from the original: no lossy round trip
                new = new.to(buf.dtype) if buf.is_meta else buf.to(new.device)
            self._buffers[name] = new
        return self

    #: per-instance caches of compiled kernels and prepared views: rebuilt on first use,
    #: never copied (TVM function handles cannot be deep-copied or pickled)
    _TRANSIENT = ("_decode_state",)

    def __deepcopy__(self, memo):
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k not in self._TRANSIENT:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def realign(self) -> "QuantLinear":
        """Copy buffers that are not 64-byte aligned (e.g. mapped from a safetensors file):
        the kernels read them in place, and TVM needs aligned data."""
        for name, buf in self._buffers.items():
            if buf is not None and buf.data_ptr() % 64:
                self._buffers[name] = buf.clone()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if _tracing(x):  # export / compile see the op; eager calls skip the dispatcher
            return torch.ops.abqc.qlinear(x, self.weight_packed, self.weight_scale,
                                          self.weight_zero_point, self.weight_sum, self.group_k,
                                          self.bias, self.outlier_indices, self.outlier_values,
                                          self.spec)
        if x.is_cuda:
            return self.forward_cuda(x)
        if x.numel() == self.fmt.k:
            if self.fmt.formulation == "unpack":
                return self._decode_one(x)
            if self.fmt.formulation == "vnni":
                return self._decode_one_vnni(x)
        return qlinear_impl(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                            self.weight_sum, self.group_k, self.bias, self.outlier_indices,
                            self.outlier_values, self.spec)

    def _decode_one(self, x: Tensor) -> Tensor:
        """One token (a decode step): the activation buffers and the TVM views of the packed
        weight are made once and reused; per call, only x and y cross DLPack."""
        b = self._buffers  # (hot path: see `_decode_one_vnni`)
        key = (b["weight_packed"].data_ptr(), b["weight_scale"].data_ptr(),
               b["weight_zero_point"].data_ptr())
        st = self.__dict__.get("_decode_state")
        if st is None or st[0] != key:
            kern = kernels.kernel(self.fmt, 1, self.spec)
            if kern.m_tile != 1:
                return qlinear_impl(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                    self.weight_sum, self.group_k, self.bias, self.outlier_indices,
                                    self.outlier_values, self.spec)
            s = self.fmt.shape
            xq, xs = torch.empty(1, s.kp), torch.empty(1, s.groups)
            aq = actquant_kernel(self.fmt.k, s.kp, s.groups, self.fmt.abits, self.fmt.act_symmetric, 1)
            st = (key, aq, kern._main, xq, xs, _dl(xq), _dl(xs), _dl(self.weight_packed),
                  _dl(self.weight_scale), _dl(self.weight_zero_point))
            self.__dict__["_decode_state"] = st
        _, aq, main, xq, _, xq_t, xs_t, w_t, s_t, z_t = st
        x2 = x.reshape(1, self.fmt.k)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = torch.empty(1, self.fmt.n)
        aq(_dl(x2), xq_t, xs_t, 1)
        main(xq_t, w_t, s_t, z_t, xs_t, _dl(y), 1)
        outliers, bias = b["outlier_indices"], b["bias"]
        if outliers is not None and outliers.numel():
            y += torch.sparse.mm(self._outliers(), xq[:, :self.fmt.k].T).T
        if bias is not None:
            y += bias
        y = y.view(*x.shape[:-1], self.fmt.n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _decode_one_vnni(self, x: Tensor) -> Tensor:
        """One token on the vnni kernel: activation codes, grid and sums by one TVM kernel
        into buffers made once, with the weight's TVM views (as `_decode_one`). This runs
        once per linear per generated token, so it reads buffers from ``_buffers`` directly
        (nn.Module attribute lookup costs a microsecond each)."""
        b = self._buffers
        key = (b["weight_packed"].data_ptr(), b["weight_scale"].data_ptr(),
               b["weight_zero_point"].data_ptr(), b["weight_sum"].data_ptr())
        st = self.__dict__.get("_decode_state")
        if st is None or st[0] != key:
            fmt = self.fmt
            kp = vnni_kp(fmt.k, fmt.wbits)
            bufs = (torch.empty(1, kp, dtype=torch.uint8), torch.empty(1), torch.empty(1),
                    torch.empty(1, 1, dtype=torch.int32))
            views = tuple(_dl(b) for b in bufs)
            wviews = tuple(_dl(b) for b in (self.weight_packed, self.weight_scale,
                                            self.weight_zero_point, self.weight_sum, self.group_k))
            aq = actcodes_kernel(fmt.k, kp, fmt.abits, fmt.act_symmetric)
            st = (key, aq, kernels.kernel(fmt, 1, self.spec)._main, bufs, views, wviews)
            self.__dict__["_decode_state"] = st
        _, aq, main, bufs, (xc, sx, zx, sumx), (w, sw, zw, sumw, kg) = st
        fmt = self.fmt
        x2 = x.reshape(1, fmt.k)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = torch.empty(1, fmt.n)
        aq(_dl(x2), xc, sx, zx, sumx)
        main(xc, w, sx, zx, sumx, sw, zw, sumw, kg, _dl(y))
        outliers, bias = b["outlier_indices"], b["bias"]
        if outliers is not None and outliers.numel():
            y += torch.sparse.mm(self._outliers(), _fake_quant_tokens(x2, fmt).T).T
        if bias is not None:
            y += bias
        y = y.view(*x.shape[:-1], fmt.n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _outliers(self) -> Tensor:
        return _outlier_matrix(self.outlier_indices, self.outlier_values, self.fmt)

    def codes(self) -> Tensor:
        """The weight's integer codes uint8 [N, K], unpacked from whatever layout it is in."""
        fmt, layout = self.fmt, packing_of(self.fmt.formulation)
        if layout == "codes":
            return unpack_codes(self.weight_packed, fmt.wbits, fmt.k)
        if layout == "bitplanes":
            return P.unpack_bitplanes(self.weight_packed, fmt.k).to(torch.uint8)
        if layout == "vnni":
            return unpack_vnni(self.weight_packed, fmt.wbits, fmt.n, fmt.k)
        return P.unpack_nibbles(self.weight_packed, fmt.k).to(torch.uint8)

    def dequantized_weight(self) -> Tensor:
        """float32 [N, K]: (code - zero) * scale, per row or per group."""
        reps = self.group_k.to(torch.int64).to(self.weight_scale.device)
        scale = torch.repeat_interleave(self.weight_scale, reps, dim=1)[:, :self.fmt.k]
        zero = torch.repeat_interleave(self.weight_zero_point, reps, dim=1)[:, :self.fmt.k]
        return (self.codes().float() - zero) * scale

    def _cuda_state_key(self):
        return (self.weight_packed.data_ptr(), self.weight_scale.data_ptr(),
                self.weight_zero_point.data_ptr())

    def forward_cuda(self, x: Tensor) -> Tensor:
        """On a GPU: the b1 tensor-core kernel (`abqc.codegen.cuda`) for per-channel WxAy
        with activations of 1..8 bits; weight-only and grouped formats, which those kernels
        do not cover, run as a float matmul on the dequantized weight (activations still
        fake-quantized per token), so the result is the same function of x."""
        fmt = self.fmt
        x2 = x.reshape(-1, fmt.k).float()
        m = x2.shape[0]
        st = self.__dict__.setdefault("_cuda_state", {})
        if st.get("key") != self._cuda_state_key():
            st.clear()
            st["key"] = self._cuda_state_key()
        xa = None
        if fmt.weight_only or fmt.group_size:
            if "w" not in st:
                st["w"] = self.dequantized_weight()
            xa = x2 if fmt.weight_only else _fake_quant_tokens(x2, fmt)
            y = xa @ st["w"].T
        elif m == 0:
            y = x2.new_empty(0, fmt.n)
        else:
            from ..codegen.compute import KernelShape
            from ..codegen.cuda import runtime as cuda_rt

            km = ("for_m", m if m <= cuda_rt.DECODE_MAX_M else cuda_rt.m_bucket(m))
            kern = st.get(km)
            if kern is None:  # the tuning-log lookup once per token-count bucket, not per call
                kern = st[km] = cuda_rt.kernel_for(KernelShape(fmt.n, fmt.k, fmt.wbits, fmt.abits),
                                                   m, x.device)
            kw = ("kernel", id(kern))
            if kw not in st:
                st[kw] = kern.pack_weight(self.codes(), self.weight_scale.reshape(-1),
                                          self.weight_zero_point.reshape(-1))
            y = kern(x2, st[kw], fmt.act_symmetric)
        if self.outlier_indices is not None and self.outlier_indices.numel():
            if xa is None:
                xa = _fake_quant_tokens(x2, fmt)
            y = y + torch.sparse.mm(self._outliers(), xa.T).T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*x.shape[:-1], fmt.n).to(x.dtype)

    def extra_repr(self) -> str:
        return str(self.fmt)
