"""The kernels' maths as TE compute definitions (what is computed, not how).

Four formulations, all over zero-padded K (see `packing`), M symbolic (any token count):

- ``bitserial``: integer activations, ``acc = Σ_i Σ_j 2^(i+j) popcount(X_i AND W_j)``;
- ``lut``: integer activations, per group of 4 activations a 16-entry table of subset sums,
  each weight plane's 4-bit slice picks an entry: ``acc = Σ_j 2^j Σ_kk T[kk, W_j[kk]]``;
- ``wo_bitserial`` / ``wo_lut``: float activations (WxA16), weight bits unpacked in the
  kernel, or float tables.

The integer ones end in the dequantization epilogue, per group g (one group per channel):
``y = s_x Σ_g s_w (acc_g - z_w Σx_g - z_x Σw_g + K_g z_x z_w)``, computed in float64 (the
terms are large and cancel) and stored as float32. Weight-only: ``y = Σ_g s_w (acc_g - z_w Σx_g)``.
Every integer kernel (``bitserial``, ``lut``, both ``vnni`` kernels) computes that epilogue by
`group_term`: one expression tree, the same on every CPU, that torch reproduces operation for
operation (`abqc.runtime.reference.FakeQuantLinear`), so the two agree bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

from .packing import TABLE_GROUP, WORD, padded_k

FORMULATIONS = ("bitserial", "lut")
WO_FORMULATIONS = ("wo_bitserial", "wo_lut")


@dataclass(frozen=True)
class KernelShape:
    """One linear: N outputs, K inputs (real), groups of `group_size` (0: per channel)."""

    n: int
    k: int
    wbits: int
    abits: int  # 16: float activations (weight-only)
    group_size: int = 0

    @property
    def kp(self) -> int:
        return padded_k(self.k, self.group_size)

    @property
    def groups(self) -> int:
        return self.kp // self.group_size if self.group_size else 1

    def group_lengths(self) -> list[float]:
        """Real (unpadded) K of each group, for the K_g z_x z_w term."""
        gs = self.group_size or self.kp
        return [float(max(0, min(gs, self.k - g * gs))) for g in range(self.groups)]


def no_contract(product):
    """`product` unchanged, behind an ``llvm.arithmetic.fence``: TVM lets LLVM contract a
    multiply and a following add into one FMA (``AllowFPOpFusion=Fast``; the epilogues built
    here compiled to ``vfmsub213pd`` / ``vfnmadd231pd``), which rounds once where the same
    expression in torch rounds twice. Behind the fence the product is rounded on its own, as
    IEEE float64, on every x86-64 CPU."""
    return tirx.call_llvm_pure_intrin(str(product.ty), "llvm.arithmetic.fence", product)


def group_term(acc64, sumx, zx, kg, sw, zw, sumw):
    """One group's float64 epilogue term ``s_w (((acc - z_w Σx) - z_x Σw) + (K z_x) z_w)``,
    in exactly this order, each product rounded on its own (`no_contract`); all arguments
    float64 expressions (scalars or vectors of the same lanes). The result is ``y = s_x Σ_g``
    of these, g = 0, 1, ... in order. With integer (or half-integer) zero points on both
    sides every product and partial sum here is an exact float64 (|acc| < 2^31, products
    < 2^40), so only ``s_w *`` and ``s_x *`` round; with a fractional zero (1-bit asymmetric
    grids) the sums round too, the same way in torch: no contraction, no reassociation (TVM
    builds without fast-math)."""
    f = no_contract
    return f(sw * (acc64 - f(zw * sumx) - f(zx * sumw) + f(f(kg * zx) * zw)))


def _epilogue(acc, m, shape: KernelShape, weight_only: bool):
    n, g_count = shape.n, shape.groups
    sw = te.placeholder((n, g_count), "float32", name="sw")
    zw = te.placeholder((n, g_count), "float32", name="zw")
    g = te.reduce_axis((0, g_count), "g")
    if weight_only:
        xs = te.placeholder((m, g_count), "float32", name="xs")
        y = te.compute((m, n), lambda a, b: te.sum(
            sw[b, g].astype("float64") * (acc[a, b, g].astype("float64")
                                         - zw[b, g].astype("float64") * xs[a, g].astype("float64")),
            axis=g), name="y64")
        out = te.compute((m, n), lambda a, b: y[a, b].astype("float32"), name="y")
        return [sw, zw, xs], out
    sx = te.placeholder((m,), "float32", name="sx")
    zx = te.placeholder((m,), "float32", name="zx")
    sumx = te.placeholder((m, g_count), "int32", name="sumx")
    sumw = te.placeholder((n, g_count), "int32", name="sumw")
    kg = te.placeholder((g_count,), "float32", name="kg")

    def f64(t):
        return t.astype("float64")

    y = te.compute((m, n), lambda a, b: te.sum(
        group_term(f64(acc[a, b, g]), f64(sumx[a, g]), f64(zx[a]), f64(kg[g]), f64(sw[b, g]),
                   f64(zw[b, g]), f64(sumw[b, g])), axis=g), name="y64")
    out = te.compute((m, n), lambda a, b: (f64(sx[a]) * y[a, b]).astype("float32"), name="y")
    return [sx, zx, sumx, sw, zw, sumw, kg], out


def _prim_func(inputs, acc, m, shape: KernelShape, with_epilogue: bool, weight_only: bool):
    """The accumulator alone (``acc`` out) or followed by the epilogue (float32 ``y`` out)."""
    if not with_epilogue:
        return te.create_prim_func([*inputs, acc])
    extra, y = _epilogue(acc, m, shape, weight_only)
    return te.create_prim_func([*inputs, *extra, y])


def bitserial(shape: KernelShape, with_epilogue: bool = True):
    m = te.var("m")
    kw, g_count = shape.kp // WORD, shape.groups
    kwg = kw // g_count
    x = te.placeholder((shape.abits, m, kw), "int64", name="X")
    w = te.placeholder((shape.wbits, shape.n, kw), "int64", name="W")
    i = te.reduce_axis((0, shape.abits), "i")
    j = te.reduce_axis((0, shape.wbits), "j")
    k = te.reduce_axis((0, kwg), "k")
    acc = te.compute((m, shape.n, g_count), lambda a, b, g: te.sum(
        tirx.popcount(x[i, a, g * kwg + k] & w[j, b, g * kwg + k]).astype("int32")
        << (i + j).astype("int32"), axis=[i, j, k]), name="acc")
    return _prim_func([x, w], acc, m, shape, with_epilogue, weight_only=False)


def _table(shape: KernelShape, with_epilogue: bool, weight_only: bool):
    """``acc = Σ_j 2^j Σ_kk T[kk, W_j[kk]]``: int16 tables of codes, or float32 tables of x."""
    m = te.var("m")
    kt, g_count = shape.kp // TABLE_GROUP, shape.groups
    ktg = kt // g_count
    t = te.placeholder((m, kt, 1 << TABLE_GROUP), "float32" if weight_only else "int16", name="T")
    w = te.placeholder((shape.wbits, shape.n, kt), "uint8", name="Wn")
    j = te.reduce_axis((0, shape.wbits), "j")
    k = te.reduce_axis((0, ktg), "k")

    def term(a, b, g):
        entry = t[a, g * ktg + k, w[j, b, g * ktg + k]]
        if weight_only:
            return entry * (1 << j).astype("float32")
        return entry.astype("int32") << j.astype("int32")

    acc = te.compute((m, shape.n, g_count), lambda a, b, g: te.sum(term(a, b, g), axis=[j, k]),
                     name="acc")
    return _prim_func([t, w], acc, m, shape, with_epilogue, weight_only)


def lut(shape: KernelShape, with_epilogue: bool = True):
    return _table(shape, with_epilogue, weight_only=False)


def wo_lut(shape: KernelShape, with_epilogue: bool = True):
    return _table(shape, with_epilogue, weight_only=True)


def wo_bitserial(shape: KernelShape, with_epilogue: bool = True):
    m = te.var("m")
    kp, g_count = shape.kp, shape.groups
    kg = kp // g_count
    x = te.placeholder((m, kp), "float32", name="x")
    w = te.placeholder((shape.wbits, shape.n, kp // WORD), "int64", name="W")
    j = te.reduce_axis((0, shape.wbits), "j")
    k = te.reduce_axis((0, kg), "k")

    def bit(jj, b, kk):
        word = w[jj, b, kk // WORD]
        return ((word >> (kk % WORD).astype("int64")) & tirx.const(1, "int64")).astype("float32")

    acc = te.compute((m, shape.n, g_count), lambda a, b, g: te.sum(
        x[a, g * kg + k] * bit(j, b, g * kg + k) * (1 << j).astype("float32"),
        axis=[j, k]), name="acc")
    return _prim_func([x, w], acc, m, shape, with_epilogue, weight_only=True)


COMPUTES = {"bitserial": bitserial, "lut": lut, "wo_bitserial": wo_bitserial, "wo_lut": wo_lut}
#: formulations that take any activation width (float in; see `unpack`)
ANY_FORMULATIONS = ("unpack",)
#: integer formulations that need a CPU feature (see `vnni`): per channel, abits <= 8
VNNI_FORMULATIONS = ("vnni",)


def formulations_for(abits: int) -> tuple[str, ...]:
    """The formulations that can run a kernel with `abits` activations (16: float)."""
    return (WO_FORMULATIONS if abits == 16 else FORMULATIONS + VNNI_FORMULATIONS) + ANY_FORMULATIONS


def packing_of(formulation: str) -> str:
    """Which weight layout a formulation reads: bit planes, table nibbles or packed codes."""
    return {"bitserial": "bitplanes", "wo_bitserial": "bitplanes", "lut": "nibbles",
            "wo_lut": "nibbles", "unpack": "codes", "vnni": "vnni"}[formulation]
