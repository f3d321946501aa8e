"""One block of QuantEase's coordinate-descent sweep as a single Triton kernel (CUDA).

The torch sweep (`quantease.cd_sweep`) does ~10 small ops per input column; on a GPU each is
a kernel launch, so a sweep is launch-bound (~100 µs a column, minutes per model). Rows of W
are independent given Σ, so one program owns a slice of rows (columns of the transposed
arrays) and walks the block's columns in order with its slice of the residual ``R`` held in
registers: one launch per block of columns instead of ~10 per column.

Same arithmetic as the torch sweep: ``β = Ŵ_j + R_j``, rounded half-to-even onto the fixed
grid (IEEE division), ``R_{j+1:b} -= N_{j,j+1:b} ⊗ (β - Ŵ_j)``. Only summation order and
fused multiply-adds may differ. Runs under ``TRITON_INTERPRET=1`` on CPU tensors too,
which is how the tests check it on a machine without a GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch sweep is used without it
    triton = None


def available(t: torch.Tensor) -> bool:
    """Whether the Triton block kernel can run on `t` (a CUDA tensor, triton installed, and
    not switched off with ``ABQC_TRITON=0``, which keeps the torch sweep for comparison)."""
    import os

    if triton is None or os.environ.get("ABQC_TRITON") == "0":
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _round_half_even(x):
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _cd_block_kernel(what_ptr, r_ptr, n_ptr, s_ptr, z_ptr, delta_ptr, a, b, N, K, qmax,
                         ROUND: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        cmask = cols < N
        rows = tl.arange(0, BS)
        rmask = (a + rows) < b
        tile = (a + rows)[:, None] * N + cols[None, :]
        R = tl.load(r_ptr + tile, mask=rmask[:, None] & cmask[None, :], other=0.0)
        for jj in range(0, BS):  # constexpr bound (the interpreter needs one); jj >= b-a masked
            j = a + jj
            m = cmask & (j < b)
            r_j = tl.sum(tl.where((rows == jj)[:, None], R, 0.0), axis=0)
            w_j = tl.load(what_ptr + j * N + cols, mask=m, other=0.0)
            beta = w_j + r_j
            if ROUND:
                s = tl.load(s_ptr + j * N + cols, mask=m, other=1.0)
                z = tl.load(z_ptr + j * N + cols, mask=m, other=0.0)
                q = _round_half_even(tl.math.div_rn(beta, s) + z)
                q = tl.minimum(tl.maximum(q, 0.0), qmax)
                beta = s * (q - z)
            dj = beta - w_j
            tl.store(what_ptr + j * N + cols, beta, mask=m)
            tl.store(delta_ptr + jj * N + cols, dj, mask=m)
            nrow = tl.load(n_ptr + j * K + a + rows, mask=(rows > jj) & rmask & (j < b), other=0.0)
            R = R - nrow[:, None] * dj[None, :]


def cd_block(what_t: torch.Tensor, r: torch.Tensor, n: torch.Tensor, st: torch.Tensor,
             zt: torch.Tensor, qmax: int, a: int, b: int, round_: bool) -> torch.Tensor:
    """Columns a..b-1 of one sweep, in place on ``what_t`` [K, N]; returns their changes
    ``delta`` [b-a, N] for the lazy update of the later columns. All inputs contiguous fp32."""
    k, nrows = what_t.shape
    bs = triton.next_power_of_2(b - a)
    bn = 32
    delta = torch.empty(b - a, nrows, dtype=what_t.dtype, device=what_t.device)
    _cd_block_kernel[(triton.cdiv(nrows, bn),)](
        what_t, r, n, st, zt, delta, a, b, nrows, k, float(qmax),
        ROUND=bool(round_), BS=bs, BN=bn, num_warps=4)
    return delta
