"""GGML block types as llama.cpp stores them: the grid of each, its byte layout, in torch.

Every type here is, per sub-block of `GGMLType.sub` weights, an affine grid
``x = a * q + b`` over integer codes ``q in [0, qmax]``, with ``a`` and ``b`` computed from
the stored fields exactly as llama.cpp's ``dequantize_row_*`` computes them (one fp32
rounding at most: ``a * q`` is exact because ``a`` has at most 17 significant bits and ``q``
at most 8), so the values a solver chooses are bit for bit the values llama.cpp reads:

| type | block | bytes | sub-block | value |
| --- | --- | --- | --- | --- |
| Q8_0 | 32 | 34 | 32 | ``d * l``, l in -127..127 (code = l + 127) |
| Q5_0 | 32 | 22 | 32 | ``d * (q - 16)`` |
| Q4_0 | 32 | 18 | 32 | ``d * (q - 8)`` |
| Q4_1 | 32 | 20 | 32 | ``d * q + m`` |
| Q4_K | 256 | 144 | 32 | ``(d * sc) * q - (dmin * mn)``, sc/mn 6-bit |
| Q3_K | 256 | 110 | 16 | ``(d * (sc - 32)) * (q - 4)``, sc 6-bit |
| Q2_K | 256 | 84 | 16 | ``(d * sc) * q - (dmin * mn)``, sc/mn 4-bit |

(d, m, dmin fp16.) `fit_grid` chooses the stored fields from the weights (a weighted
least-squares search per sub-block, importance = diag(Σ) when given, then the sub-block
scales quantized to the format's 6/4 bits under the fp16 super scales); the grid is then
fixed, and a solver (RTN, GPTQ, QuantEase) only chooses the codes on it. `quantize_blocks`
packs codes + fields into llama.cpp's bytes, `dequantize` reads such bytes back.

Scales are never zero (a zero sub-block scale would make every code mean the same value;
the smallest non-zero scale is chosen instead), so every grid is invertible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..solvers.grid import Grid


@dataclass(frozen=True)
class GGMLType:
    """One GGML block type: elements per block, bytes per block, elements per sub-block
    (the affine grid's group), the largest code."""

    name: str
    block: int
    nbytes: int
    sub: int
    qmax: int

    @property
    def bits(self) -> int:
        """Code width (for a `QuantSpec`): Q8_0's 255 codes need 8 bits."""
        return max(1, int(self.qmax).bit_length())

    @property
    def bpw(self) -> float:
        """Bits per weight, scales included."""
        return 8 * self.nbytes / self.block


TYPES = {t.name: t for t in (
    GGMLType("Q8_0", 32, 34, 32, 254),
    GGMLType("Q5_0", 32, 22, 32, 31),
    GGMLType("Q4_0", 32, 18, 32, 15),
    GGMLType("Q4_1", 32, 20, 32, 15),
    GGMLType("Q4_K", 256, 144, 32, 15),
    GGMLType("Q3_K", 256, 110, 16, 7),
    GGMLType("Q2_K", 256, 84, 16, 3),
)}
#: what llama.cpp's quantizer puts a tensor in when its rows do not split into the type's
#: blocks (llama-quant.cpp, tensor_type_fallback)
FALLBACK = {"Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}

#: symmetric types: code offset (value = d * (q - offset))
_SYM_OFFSET = {"Q8_0": 127, "Q5_0": 16, "Q4_0": 8, "Q3_K": 4}
_FP16_TINY = 2.0 ** -24  # the smallest positive fp16 (subnormal)


def ggml_type(name: str) -> GGMLType:
    if name not in TYPES:
        raise ConfigError(f"GGUF type {name!r} is not supported; allowed: {', '.join(TYPES)}")
    return TYPES[name]


def type_for_row(name: str, k: int) -> GGMLType:
    """The type a row of `k` weights gets when `name` is asked: llama.cpp's fallback when
    `k` does not split into `name`'s blocks (a `ConfigError` when neither fits)."""
    t = ggml_type(name)
    if k % t.block == 0:
        return t
    if name in FALLBACK and k % TYPES[FALLBACK[name]].block == 0:
        return TYPES[FALLBACK[name]]
    raise ConfigError(f"rows of {k} weights split into neither {name}'s blocks of {t.block}"
                      f"{' nor ' + FALLBACK[name] + ' blocks' if name in FALLBACK else ''}")


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _nonzero_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 of `x`, with zeros (and values that round to zero) replaced by the tiniest fp16
    of the same sign (positive for 0)."""
    h = _fp16(x)
    tiny = torch.where(x < 0, -_FP16_TINY, _FP16_TINY).to(torch.float16)
    return torch.where(h == 0, tiny, h)


# --------------------------------------------------------------------------- sub-block fits

def _candidates(n: int = 10) -> torch.Tensor:
    return torch.arange(-n, n + 1, dtype=torch.float32) * 0.1


def _fit_sym(x: torch.Tensor, w: torch.Tensor, lmin: int, lmax: int) -> torch.Tensor:
    """Per row of `x` [G, n], the scale d minimising sum w (x - d*l)², l = clamp(round(x/d),
    lmin, lmax): candidates map the largest |x| to lmin or lmax (± tenths), each refitted by
    weighted least squares over its levels. Returns d [G] (fp32, not yet fp16)."""
    amax_i = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, amax_i)  # signed value of largest magnitude [G, 1]
    safe = torch.where(mx == 0, torch.ones_like(mx), mx)
    best_d = (mx / lmin).squeeze(1)
    best_e = torch.full_like(best_d, float("inf"))
    for end in (lmin, lmax):
        for c in _candidates():
            inv = (end + (c if end > 0 else -c)) / safe  # maps mx to ~end
            if end > 0 and end + c <= 0:
                continue
            lv = torch.round(x * inv).clamp_(lmin, lmax)
            swl = (w * x * lv).sum(1)
            sll = (w * lv * lv).sum(1)
            d = torch.where(sll > 0, swl / sll.clamp_min(1e-30), 1 / inv.squeeze(1))
            d16 = _nonzero_fp16(d).float()
            lq = torch.round(x / d16[:, None]).clamp_(lmin, lmax)
            e = (w * (x - d16[:, None] * lq) ** 2).sum(1)
            take = e < best_e
            best_e = torch.where(take, e, best_e)
            best_d = torch.where(take, d, best_d)
    return best_d


def _fit_asym(x: torch.Tensor, w: torch.Tensor, qmax: int, nonpos_offset: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `x` [G, n], (d > 0, m) minimising sum w (x - (d*q + m))², q in 0..qmax:
    candidate steps (max - min) / (qmax ± tenths), each refitted by weighted least squares
    of (d, m) over its codes. `nonpos_offset`: m <= 0 (K-quants store the min subtracted)."""
    lo = x.min(1).values
    hi = x.max(1).values
    if nonpos_offset:
        lo = lo.clamp(max=0)
    span = (hi - lo).clamp_min(1e-30)
    best_d, best_m = span / qmax, lo.clone()
    best_e = torch.full_like(lo, float("inf"))
    sw, swx = w.sum(1), (w * x).sum(1)
    for c in _candidates():
        if qmax + c * (qmax / 15) <= 0:
            continue
        d0 = span / (qmax + c * max(1.0, qmax / 15))
        q = torch.round((x - lo[:, None]) / d0[:, None]).clamp_(0, qmax)
        swq, swqq, swxq = (w * q).sum(1), (w * q * q).sum(1), (w * x * q).sum(1)
        det = swqq * sw - swq * swq
        ok = det > 1e-30 * (swqq * sw).clamp_min(1e-30)
        d = torch.where(ok, (swxq * sw - swq * swx) / torch.where(ok, det, torch.ones_like(det)), d0)
        m = torch.where(ok, (swqq * swx - swq * swxq) / torch.where(ok, det, torch.ones_like(det)), lo)
        if nonpos_offset:
            pos = m > 0
            d = torch.where(pos, swxq / swqq.clamp_min(1e-30), d)
            m = torch.where(pos, torch.zeros_like(m), m)
        bad = d <= 0
        d = torch.where(bad, d0, d)
        m = torch.where(bad, lo, m)
        qq = torch.round((x - m[:, None]) / d[:, None]).clamp_(0, qmax)
        e = (w * (x - (d[:, None] * qq + m[:, None])) ** 2).sum(1)
        take = e < best_e
        best_e, best_d, best_m = (torch.where(take, e, best_e), torch.where(take, d, best_d),
                                  torch.where(take, m, best_m))
    return best_d, best_m


# --------------------------------------------------------------------------- grids

@dataclass
class TypeGrid:
    """The fixed grid of one [N, K] tensor in one GGML type: the stored fields per block
    (fp16 tensors as `torch.float16`, small integers as int32), blocks in row-major order."""

    type: GGMLType
    shape: tuple[int, int]
    fields: dict[str, torch.Tensor]

    @property
    def nblocks(self) -> int:
        return self.shape[0] * self.shape[1] // self.type.block

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) per sub-block, [nblocks, block/sub] fp32: value = a * q + b, as llama.cpp
        computes them from the stored fields."""
        f, name = self.fields, self.type.name
        if name in ("Q8_0", "Q5_0", "Q4_0"):
            a = f["d"].float()[:, None]
            return a, -_SYM_OFFSET[name] * a
        if name == "Q4_1":
            return f["d"].float()[:, None], f["m"].float()[:, None]
        if name in ("Q4_K", "Q2_K"):
            a = f["d"].float()[:, None] * f["sc"].float()
            return a, -(f["dmin"].float()[:, None] * f["mn"].float())
        if name == "Q3_K":
            a = f["d"].float()[:, None] * (f["sc"] - 32).float()
            return a, -4 * a
        raise AssertionError(name)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        return t.repeat_interleave(self.type.sub, dim=1).reshape(n, k)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """The fp32 weights codes [N, K] stand for (exactly what llama.cpp dequantizes)."""
        a, b = self.affine()
        return self._expand(a) * codes.float() + self._expand(b)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest codes of `w` [N, K] on this grid (uint8)."""
        a, b = self.affine()
        q = torch.round((w.float() - self._expand(b)) / self._expand(a))
        return q.clamp_(0, self.type.qmax).to(torch.uint8)

    def solver_grid(self) -> Grid:
        """The same grid as a solver `Grid` (x = s (q - z), per sub-block group)."""
        a, b = self.affine()
        n, k = self.shape
        g = k // self.type.sub
        return Grid(a.reshape(n, g), (-b / a).reshape(n, g), self.type.qmax, self.type.sub, k)


def fit_grid(type_name: str, w: torch.Tensor, importance: torch.Tensor | None = None,
             chunk: int = 4096) -> TypeGrid:
    """Fix the grid of `w` [N, K] in `type_name` (see the module docstring).

    `importance` [K] (e.g. diag(Σ) of the layer's inputs) weights each column's squared error
    in the per-sub-block fit; None = plain squared error."""
    t = ggml_type(type_name)
    n, k = w.shape
    if k % t.block:
        raise ConfigError(f"{type_name} needs rows of a multiple of {t.block} weights; got {k}")
    w = w.detach().float()
    if importance is None:
        imp = torch.ones(k)
    else:
        imp = importance.detach().float().clamp_min(0)
        imp = imp + 1e-6 * imp.mean().clamp_min(1e-30)  # no column entirely ignored
    blocks = w.reshape(-1, t.block)
    wts = imp.reshape(1, k).expand(n, k).reshape(-1, t.block)
    parts: list[dict[str, torch.Tensor]] = []
    for i in range(0, blocks.shape[0], chunk):
        parts.append(_fit_blocks(t, blocks[i:i + chunk], wts[i:i + chunk]))
    fields = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return TypeGrid(t, (n, k), fields)


def _fit_blocks(t: GGMLType, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stored fields for blocks `x` [nb, block] with weights `w`."""
    name = t.name
    if name in ("Q8_0", "Q5_0", "Q4_0"):
        off = _SYM_OFFSET[name]
        return {"d": _nonzero_fp16(_fit_sym(x, w, -off, t.qmax - off))}
    if name == "Q4_1":
        d, m = _fit_asym(x, w, t.qmax, nonpos_offset=False)
        return {"d": _nonzero_fp16(d), "m": _fp16(m)}
    nsub = t.block // t.sub
    xs, ws = x.reshape(-1, t.sub), w.reshape(-1, t.sub)
    if name == "Q3_K":
        s = _fit_sym(xs, ws, -4, 3).reshape(-1, nsub)  # signed sub-block scales
        mx = s.gather(1, s.abs().argmax(1, keepdim=True)).squeeze(1)
        d = _nonzero_fp16(-mx / 32)
        l = torch.round(s / d.float()[:, None]).clamp_(-32, 31)
        l = torch.where(l == 0, torch.ones_like(l), l)
        return {"d": d, "sc": (l + 32).to(torch.int32)}
    levels = 63 if name == "Q4_K" else 15
    d_sub, m_sub = _fit_asym(xs, ws, t.qmax, nonpos_offset=True)
    scale, mins = d_sub.reshape(-1, nsub), (-m_sub).reshape(-1, nsub)
    d = _nonzero_fp16(scale.max(1).values / levels)
    dmin = _fp16(mins.max(1).values / levels)
    sc = torch.round(scale / d.float()[:, None]).clamp_(1, levels)
    dm = dmin.float()[:, None]
    mn = torch.where(dm > 0, torch.round(mins / torch.where(dm > 0, dm, torch.ones_like(dm))),
                     torch.zeros_like(mins)).clamp_(0, levels)
    return {"d": d, "dmin": dmin, "sc": sc.to(torch.int32), "mn": mn.to(torch.int32)}


# --------------------------------------------------------------------------- bytes

def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    """fp16 [nb] -> its little-endian bytes [nb, 2] (x86-64 and every GGUF are little-endian)."""
    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def _bytes_half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1)


def _pack_nibbles32(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] codes 0..15 -> [nb, 16]: byte j = q[j] | q[j+16] << 4."""
    return _u8(q[:, :16] | (q[:, 16:] << 4))


def _pack_2bit_256(q: torch.Tensor) -> torch.Tensor:
    """[nb, 256] codes 0..3 -> [nb, 64]: per 128 elements, byte l of 32 holds elements
    l, l+32, l+64, l+96 at bit shifts 0, 2, 4, 6."""
    q = q.reshape(-1, 2, 4, 32)
    return _u8(q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit_256(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 2, 1, 32).to(torch.int32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    return ((b >> shifts) & 3).reshape(-1, 256)


def _pack_k4_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K's 8 six-bit scales and mins in 12 bytes (llama.cpp's get_scale_min_k4 layout)."""
    out = torch.zeros(sc.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return _u8(out)


def _unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], 1)
    mn = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], 1)
    return sc, mn


def _pack_q3_scales(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 six-bit scales in 12 bytes: low nibbles of 0..7 in bytes 0..7, of 8..15 in
    their high nibbles; the top two bits of scale j at bits 2*(j//4) of byte 8 + j%4."""
    out = torch.zeros(sc.shape[0], 12, dtype=torch.int32)
    out[:, 0:8] = (sc[:, 0:8] & 0xF) | ((sc[:, 8:16] & 0xF) << 4)
    hi = (sc >> 4) & 3
    for j in range(16):
        out[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return _u8(out)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32)
    low = torch.cat([b[:, 0:8] & 0xF, b[:, 0:8] >> 4], 1)
    hi = torch.stack([(b[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], 1)
    return low | (hi << 4)


def quantize_blocks(codes: torch.Tensor, grid: TypeGrid) -> bytes:
    """llama.cpp's bytes for `codes` [N, K] (0..qmax) on `grid`: rows of blocks, row-major."""
    t = grid.type
    if tuple(codes.shape) != tuple(grid.shape):
        raise ConfigError(f"codes {tuple(codes.shape)} do not match the grid {grid.shape}")
    if int(codes.max()) > t.qmax or int(codes.min()) < 0:
        raise ConfigError(f"{t.name} codes must be in 0..{t.qmax}")
    q = codes.to(torch.int32).reshape(-1, t.block)
    f = grid.fields
    name = t.name
    if name == "Q8_0":
        parts = [_half_bytes(f["d"]), (q - 127).to(torch.int8).view(torch.uint8)]
    elif name == "Q4_0":
        parts = [_half_bytes(f["d"]), _pack_nibbles32(q)]
    elif name == "Q4_1":
        parts = [_half_bytes(f["d"]), _half_bytes(f["m"]), _pack_nibbles32(q)]
    elif name == "Q5_0":
        hbits = (q >> 4) & 1
        qh = (hbits.to(torch.int64) << torch.arange(32, dtype=torch.int64)).sum(1)
        qh_b = torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], 1)
        parts = [_half_bytes(f["d"]), _u8(qh_b), _pack_nibbles32(q & 0xF)]
    elif name == "Q4_K":
        qq = q.reshape(-1, 4, 2, 32)
        qs = _u8(qq[:, :, 0] | (qq[:, :, 1] << 4)).reshape(-1, 128)
        parts = [_half_bytes(f["d"]), _half_bytes(f["dmin"]), _pack_k4_scales(f["sc"], f["mn"]), qs]
    elif name == "Q3_K":
        high = (q >> 2) & 1  # element e: byte e % 32, bit e // 32
        hm = (high.reshape(-1, 8, 32) << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(1)
        parts = [_u8(hm), _pack_2bit_256(q & 3), _pack_q3_scales(f["sc"]), _half_bytes(f["d"])]
    elif name == "Q2_K":
        parts = [_u8(f["sc"] | (f["mn"] << 4)), _pack_2bit_256(q), _half_bytes(f["d"]),
                 _half_bytes(f["dmin"])]
    else:
        raise AssertionError(name)
    out = torch.cat(parts, 1)
    assert out.shape[1] == t.nbytes, (name, out.shape)
    return out.contiguous().numpy().tobytes()


def unpack_blocks(data: bytes | bytearray | memoryview, type_name: str, shape: tuple[int, int]
                  ) -> tuple[torch.Tensor, TypeGrid]:
    """(codes [N, K] int32, grid) read from llama.cpp's bytes of one tensor."""
    t = ggml_type(type_name)
    n, k = shape
    nb = n * k // t.block
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if raw.numel() != nb * t.nbytes:
        raise ConfigError(f"{type_name} [{n}, {k}] takes {nb * t.nbytes} bytes; got {raw.numel()}")
    b = raw.reshape(nb, t.nbytes)
    name = t.name
    if name == "Q8_0":
        f = {"d": _bytes_half(b[:, :2])}
        q = b[:, 2:].contiguous().view(torch.int8).to(torch.int32) + 127
    elif name in ("Q4_0", "Q4_1"):
        o = 2 if name == "Q4_0" else 4
        f = {"d": _bytes_half(b[:, :2])}
        if name == "Q4_1":
            f["m"] = _bytes_half(b[:, 2:4])
        qs = b[:, o:].to(torch.int32)
        q = torch.cat([qs & 0xF, qs >> 4], 1)
    elif name == "Q5_0":
        f = {"d": _bytes_half(b[:, :2])}
        qh = sum(b[:, 2 + i].to(torch.int64) << (8 * i) for i in range(4))
        hbits = ((qh[:, None] >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.int32)
        qs = b[:, 6:].to(torch.int32)
        q = torch.cat([qs & 0xF, qs >> 4], 1) | (hbits << 4)
    elif name == "Q4_K":
        sc, mn = _unpack_k4_scales(b[:, 4:16])
        f = {"d": _bytes_half(b[:, :2]), "dmin": _bytes_half(b[:, 2:4]), "sc": sc, "mn": mn}
        qs = b[:, 16:].to(torch.int32).reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], 2).reshape(-1, 256)
    elif name == "Q3_K":
        hm = b[:, :32].to(torch.int32)
        high = ((hm[:, None, :] >> torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)) & 1).reshape(-1, 256)
        q = _unpack_2bit_256(b[:, 32:96]) | (high << 2)
        f = {"d": _bytes_half(b[:, 108:110]), "sc": _unpack_q3_scales(b[:, 96:108])}
    elif name == "Q2_K":
        s = b[:, :16].to(torch.int32)
        q = _unpack_2bit_256(b[:, 16:80])
        f = {"d": _bytes_half(b[:, 80:82]), "dmin": _bytes_half(b[:, 82:84]), "sc": s & 0xF, "mn": s >> 4}
    else:
        raise AssertionError(name)
    return q.reshape(n, k), TypeGrid(t, (n, k), f)


def dequantize(data: bytes | bytearray | memoryview, type_name: str, shape: tuple[int, int]
               ) -> torch.Tensor:
    """fp32 [N, K] from llama.cpp's bytes of `type_name` (what ``dequantize_row_*`` gives)."""
    codes, grid = unpack_blocks(data, type_name, shape)
    return grid.values(codes)


__all__ = ["FALLBACK", "GGMLType", "TYPES", "TypeGrid", "dequantize", "fit_grid", "ggml_type",
           "quantize_blocks", "type_for_row", "unpack_blocks"]
