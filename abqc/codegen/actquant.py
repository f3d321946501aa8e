"""Per-token activation quantization for the float-accumulating kernels, in TVM.

One small kernel per (K, activation bits, symmetry, groups) replaces a dozen torch ops
per linear call (what dominates a decode step): per row it finds the min/max grid of
`abqc.quantizer.compute_qparams`, rounds half-to-even as ``torch.round`` does, writes the
grid's values ``s (q - z)`` zero-padded to the kernel's K and M, and the per-group row sums
that the weight-only epilogue needs. With ``abits = 16`` it only pads and sums.

A row holding a NaN or an infinity gets a NaN scale (and, for the integer kernels, zero
codes), so every output of that row is NaN, as in the fake-quant reference (whose grid of
such a row is NaN or infinite) and the float model: a non-finite activation never turns into
finite numbers. The check is one more pass over the row, inside the same kernel.
"""
from __future__ import annotations

import functools

import tvm
from tvm import te, tirx

from ..config import sym_zero
from .build import host_target


def _nonfinite(x, m, k: int):
    """Per row: how many of its values are NaN or infinite (int32 [m])."""
    r = te.reduce_axis((0, k), "rnf")
    return te.compute((m,), lambda a: te.sum(tirx.Select(
        tirx.isfinite(x[a, r]), tirx.const(0, "int32"), tirx.const(1, "int32")), axis=r),
        name="nonfinite")


def _grid(x, m, k: int, abits: int, symmetric: bool):
    """Per-row (scale, zero, non-finite count) as te tensors [m]: `compute_qparams`' min/max
    grid, op for op; the scale of a row with a non-finite value is NaN."""
    scale, zero = _finite_grid(x, m, k, abits, symmetric)
    bad = _nonfinite(x, m, k)
    nan = tirx.const(float("nan"), "float32")
    scale = te.compute((m,), lambda a: tirx.Select(bad[a] > 0, nan, scale[a]), name="scale_nf")
    return scale, zero, bad


def _finite_grid(x, m, k: int, abits: int, symmetric: bool):
    f32 = "float32"
    qmax = (1 << abits) - 1
    r = te.reduce_axis((0, k), "r")
    r2 = te.reduce_axis((0, k), "r2")
    if symmetric:
        amax = te.compute((m,), lambda a: te.max(tirx.abs(x[a, r]), axis=r), name="amax")
        scale = te.compute((m,), lambda a: tirx.Select(
            amax[a] * 2 / qmax > 0, amax[a] * 2 / qmax, tirx.const(1, f32)), name="scale")
        zero = te.compute((m,), lambda a: tirx.const(sym_zero(qmax), f32), name="zero")
    else:
        lo = te.compute((m,), lambda a: te.min(x[a, r], axis=r), name="lo")
        hi = te.compute((m,), lambda a: te.max(x[a, r2], axis=r2), name="hi")
        if qmax == 1:  # the two levels are min and max; fractional zero
            rng = te.compute((m,), lambda a: hi[a] - lo[a], name="rng")
            scale = te.compute((m,), lambda a: tirx.Select(rng[a] > 0, rng[a], tirx.const(1, f32)),
                               name="scale")
            zero = te.compute((m,), lambda a: -lo[a] / scale[a], name="zero")
        else:
            rng = te.compute((m,), lambda a: (tirx.max(hi[a], tirx.const(0, f32))
                                              - tirx.min(lo[a], tirx.const(0, f32))) / qmax,
                             name="rng")
            scale = te.compute((m,), lambda a: tirx.Select(rng[a] > 0, rng[a], tirx.const(1, f32)),
                               name="scale")
            zero = te.compute((m,), lambda a: tirx.min(tirx.max(tirx.nearbyint(
                -tirx.min(lo[a], tirx.const(0, f32)) / scale[a]), tirx.const(0, f32)),
                tirx.const(qmax, f32)), name="zero")
    return scale, zero


def _code(x, scale, zero, qmax: int, a, b):
    """The rounded, clamped code of x[a, b] as float32 (half-to-even, as ``torch.round``)."""
    f32 = "float32"
    q = tirx.nearbyint(x[a, b] / scale[a] + zero[a])
    return tirx.min(tirx.max(q, tirx.const(0, f32)), tirx.const(qmax, f32))


def actquant_func(k: int, kp: int, groups: int, abits: int, symmetric: bool, m_tile: int):
    mt = te.var("mt")
    m = te.var("m")
    mp = mt * m_tile
    x = te.placeholder((m, k), "float32", name="x")
    f32 = "float32"
    if abits == 16:
        xq = te.compute((mp, kp), lambda a, b: tirx.if_then_else(
            tirx.all(a < m, b < k), x[tirx.min(a, m - 1), tirx.min(b, k - 1)], tirx.const(0, f32)),
            name="xq")
    else:
        qmax = (1 << abits) - 1
        scale, zero, _ = _grid(x, m, k, abits, symmetric)

        def value(a, b):
            return (_code(x, scale, zero, qmax, a, b) - zero[a]) * scale[a]

        xq = te.compute((mp, kp), lambda a, b: tirx.if_then_else(
            tirx.all(a < m, b < k), value(tirx.min(a, m - 1), tirx.min(b, k - 1)),
            tirx.const(0, f32)), name="xq")
    gsz = kp // groups
    rg = te.reduce_axis((0, gsz), "rg")
    xs = te.compute((mp, groups), lambda a, g: te.sum(xq[a, g * gsz + rg], axis=rg), name="xs")
    return te.create_prim_func([x, xq, xs, mt])


@functools.lru_cache(maxsize=None)
def actquant_kernel(k: int, kp: int, groups: int, abits: int, symmetric: bool, m_tile: int):
    """The built function ``f(x [M, K], xq [MP, KP], xs [MP, G], MP / m_tile)`` (the handle
    itself: looking a function up in a module costs more than running it at M=1)."""
    func = actquant_func(k, kp, groups, abits, symmetric, m_tile)
    ex = tvm.compile(tvm.IRModule({"main": func}), target=host_target())
    f = ex["main"]
    f.executable = ex  # keep the module alive with its function
    return f


def actcodes_func(k: int, kp: int, abits: int, symmetric: bool):
    """For the integer kernels: codes uint8 [M, KP] (zero-padded), scale and zero [M], and
    the code row sums int32 [M, 1]."""
    m = te.var("m")
    x = te.placeholder((m, k), "float32", name="x")
    qmax = (1 << abits) - 1
    scale, zero, bad = _grid(x, m, k, abits, symmetric)
    xc = te.compute((m, kp), lambda a, b: tirx.if_then_else(
        tirx.all(b < k, bad[a] == 0), _code(x, scale, zero, qmax, a, tirx.min(b, k - 1)).astype("uint8"),
        tirx.const(0, "uint8")), name="xc")
    r = te.reduce_axis((0, kp), "r")
    sumx = te.compute((m, 1), lambda a, _: te.sum(xc[a, r].astype("int32"), axis=r), name="sumx")
    sx = te.compute((m,), lambda a: scale[a], name="sx")
    zx = te.compute((m,), lambda a: zero[a], name="zx")
    return te.create_prim_func([x, xc, sx, zx, sumx])


@functools.lru_cache(maxsize=None)
def actcodes_kernel(k: int, kp: int, abits: int, symmetric: bool):
    """The built ``f(x [M, K], codes [M, KP], sx [M], zx [M], sumx [M, 1])``."""
    ex = tvm.compile(tvm.IRModule({"main": actcodes_func(k, kp, abits, symmetric)}), target=host_target())
    f = ex["main"]
    f.executable = ex
    return f
