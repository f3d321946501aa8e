"""ABQ's block losses: DLC (double log-cosine) and AKL (attention-map symmetric KL).

- ``dlc(q, fp, fp_q)``: ``-log|cos(q, fp)| - log|cos(q, fp_q)|``, the cosine per token
  over the hidden dimension, averaged over tokens. `fp` is the float block's output
  for the float input chain, `fp_q` for the quantized input chain.
- ``akl(a_q, a_fp)``: ``KL(a_q || a_fp) + KL(a_fp || a_q)`` over the key axis of
  attention maps ``[batch, queries, keys]`` whose rows are probabilities, averaged over
  queries (a clean KL: the maps are not re-softmaxed).

Both are 0 for identical inputs and positive otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def log_cosine(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``-log|cos(q_t, target_t)|`` (cosine over the last dim)."""
    cos = F.cosine_similarity(q.float(), target.float(), dim=-1, eps=EPS)
    return -torch.log(cos.abs().clamp(min=EPS, max=1.0)).mean()


def dlc(q: torch.Tensor, fp: torch.Tensor, fp_q: torch.Tensor) -> torch.Tensor:
    return log_cosine(q, fp) + log_cosine(q, fp_q)


def double_mse(q: torch.Tensor, fp: torch.Tensor, fp_q: torch.Tensor) -> torch.Tensor:
    """The reference's companion terms: ``MSE(q, fp) + MSE(q, fp_q)``."""
    return F.mse_loss(q.float(), fp.float()) + F.mse_loss(q.float(), fp_q.float())


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (last dim); zero-probability entries of p contribute nothing."""
    lp, lq = torch.log(p.clamp(min=EPS)), torch.log(q.clamp(min=EPS))
    return (p * (lp - lq)).sum(dim=-1)


def akl(a_q: torch.Tensor, a_fp: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between two attention maps [..., queries, keys], mean over queries."""
    a_q, a_fp = a_q.float(), a_fp.float()
    return (_kl(a_q, a_fp) + _kl(a_fp, a_q)).mean()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def attention_map(q: torch.Tensor, k: torch.Tensor, n_heads: int, n_kv_heads: int,
                  head_dim: int, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """Causal ``softmax(Q Kᵀ / sqrt(d))`` averaged over heads: [batch, seq, seq].

    `q` [b, s, n_heads*d] and `k` [b, s, n_kv_heads*d] are the projections' outputs;
    `rotary` is the (cos, sin) pair a Llama-style block receives (RoPE applied here, the
    rotate-half convention), or None (OPT: no RoPE).
    """
    b, s, _ = q.shape
    q = q.float().view(b, s, n_heads, head_dim).transpose(1, 2)
    k = k.float().view(b, s, n_kv_heads, head_dim).transpose(1, 2)
    if rotary is not None:
        cos, sin = (t.float().unsqueeze(1) for t in rotary)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    if n_kv_heads != n_heads:
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / head_dim ** 0.5
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)
