"""Per-token activation quantization and bit-plane packing in one CUDA kernel.

The b1 kernels read activations as bit-plane words; done with torch ops this takes ~20
small launches (~0.5-1 ms per call, 100x the GEMV). This kernel does it in one launch:
one thread block per token reduces min/max (or max |x|), computes the scale and zero point
with the same IEEE operations as `abqc.quantizer.compute_qparams` (so the codes equal the
fake-quant graph's), rounds half-to-even, and each warp turns 32 codes into one word per
bit plane with ``__ballot_sync`` (lane j -> bit j, the order of `kernel.pack_words`).
Hand-written CUDA rather than TensorIR: TVM 0.27 has no warp-ballot builtin.
"""
from __future__ import annotations

import functools

import torch

from . import launch

_SOURCE = r"""
#define ABITS %(abits)d
#define QMAX %(qmax)d
#define MODE %(mode)d  /* 0: asymmetric, 1: symmetric, 2: asymmetric 1-bit (min/max levels) */
#define SYM_ZERO %(sym_zero)sf
#define NT 256
extern "C" __global__ void __launch_bounds__(256) abqc_actpack(
    const float* __restrict__ x, int K, int KW, int plane_stride,
    int* __restrict__ X, float* __restrict__ sx, float* __restrict__ zx, int* __restrict__ sumx) {
  const int m = blockIdx.x, t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const float* xr = x + (long long)m * K;
  __shared__ float red_a[NT / 32], red_b[NT / 32];
  __shared__ int red_s[NT / 32];
  __shared__ float s_scale, s_zero;
#if MODE == 0
  float a = 0.f, b = 0.f;  /* the range always holds 0 */
#elif MODE == 2
  float a = __int_as_float(0x7f800000), b = -__int_as_float(0x7f800000);
#else
  float a = 0.f, b = 0.f;  /* a: max |x| */
#endif
  for (int k = t; k < K; k += NT) {
    float v = xr[k];
#if MODE == 1
    a = fmaxf(a, fabsf(v));
#else
    a = fminf(a, v);
    b = fmaxf(b, v);
#endif
  }
  for (int o = 16; o; o >>= 1) {
    a = MODE == 1 ? fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o)) : fminf(a, __shfl_xor_sync(0xffffffffu, a, o));
    b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
  }
  if (lane == 0) { red_a[warp] = a; red_b[warp] = b; }
  __syncthreads();
  if (t == 0) {
    for (int w = 1; w < NT / 32; ++w) {
      a = MODE == 1 ? fmaxf(a, red_a[w]) : fminf(a, red_a[w]);
      b = fmaxf(b, red_b[w]);
    }
    float scale, zero;
#if MODE == 1
    scale = __fdiv_rn(__fmul_rn(2.f, a), (float)QMAX);
    if (!(scale > 0.f)) scale = 1.f;
    zero = SYM_ZERO;
#elif MODE == 2
    scale = __fsub_rn(b, a);
    if (!(scale > 0.f)) scale = 1.f;
    zero = __fdiv_rn(-a, scale);
#else
    scale = __fdiv_rn(__fsub_rn(b, a), (float)QMAX);
    if (!(scale > 0.f)) scale = 1.f;
    zero = fminf(fmaxf(rintf(__fdiv_rn(-a, scale)), 0.f), (float)QMAX);
#endif
    s_scale = scale; s_zero = zero;
  }
  __syncthreads();
  const float scale = s_scale, zero = s_zero;
  int sum = 0;
  for (int w = warp; w < KW; w += NT / 32) {
    const int k = w * 32 + lane;
    int code = 0;
    if (k < K) {
      float q = rintf(__fadd_rn(__fdiv_rn(xr[k], scale), zero));
      code = (int)fminf(fmaxf(q, 0.f), (float)QMAX);
    }
    sum += code;
#pragma unroll
    for (int i = 0; i < ABITS; ++i) {
      unsigned word = __ballot_sync(0xffffffffu, (code >> i) & 1);
      if (lane == 0) X[(long long)i * plane_stride + (long long)m * KW + w] = (int)word;
    }
  }
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red_s[warp] = sum;
  __syncthreads();
  if (t == 0) {
    for (int w = 1; w < NT / 32; ++w) sum += red_s[w];
    sx[m] = scale; zx[m] = zero; sumx[m] = sum;
  }
}
"""


def source(abits: int, symmetric: bool) -> str:
    """The kernel's CUDA source for one activation width and grid kind."""
    if not 1 <= abits <= 8:
        raise ValueError(f"abits={abits} has no packed activations; allowed 1..8")
    qmax = (1 << abits) - 1
    from ...config import sym_zero

    mode = 1 if symmetric else (2 if qmax == 1 else 0)
    return _SOURCE % {"abits": abits, "qmax": qmax, "mode": mode, "sym_zero": repr(float(sym_zero(qmax)))}


@functools.lru_cache(maxsize=None)
def _kernel(abits: int, symmetric: bool, arch: str, device_index: int):
    return launch.load(source(abits, symmetric), arch, "abqc_actpack", torch.device("cuda", device_index))


def quantize_pack(x: torch.Tensor, abits: int, symmetric: bool, kw: int, plane_stride: int,
                  X: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, sumx: torch.Tensor, arch: str) -> None:
    """Fill X (plane i, token m, word w at ``i*plane_stride + m*kw + w``; rows and words the
    kernel does not write keep their zeros), sx, zx, sumx [>= M] from x [M, K] float32."""
    m, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be contiguous float32, got {x.dtype}, contiguous={x.is_contiguous()}")
    if kw * 32 < k:
        raise ValueError(f"kw={kw} words hold {kw * 32} < K={k} codes")
    if m:
        _kernel(abits, symmetric, arch, x.device.index or 0)(
            (m, 1, 1), (256, 1, 1), {"x": x, "K": k, "KW": kw, "plane_stride": plane_stride, "X": X,
                                     "sx": sx, "zx": zx, "sumx": sumx})


__all__ = ["quantize_pack", "source"]
