"""`DecodeEngine`: the step that generation runs, lowered once and run without transformers.

Eager transformers code costs a decode step far more than the kernels do (module dispatch,
mask building, cache bookkeeping, ~30 µs of Python per packed linear). The engine reads the
same tensors the transformers tree holds (the program's own: nothing is copied or
re-quantized) and lowers a decoder-only step once into straight-line work per layer:

    h = embed(ids)
    per layer: x = rmsnorm(h); q, k, v = qkv(x); rope(q, k); cache[p:p+T] = k, v
               h += o(attention(q, cache[:p+T])); x = rmsnorm(h); h += down(act(gate(x)) * up(x))
    logits = lm_head(norm(h)) at the positions asked for only

with a static KV cache (preallocated, no per-step allocation), the packed linears called the
short way (`StepLinear`), and each float op written as transformers writes it, so the
logits equal the tree's up to the attention kernel's summation order (SDPA is called with
the same arguments transformers passes it).

Families: RMSNorm + gated-MLP + RoPE decoders (`abqc.families`: llama, mistral, qwen2).
Anything else (LayerNorm families, sliding windows shorter than the context, a tree in
another dtype, padded batches) is refused by `engine_unsupported` with the reason; the
caller falls back to the transformers tree and warns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...families import FAMILIES
from .linears import StepLinear

#: cache lengths are allocated in steps of this many tokens (grown by copying when full)
CACHE_STEP = 256


def engine_unsupported(tree: nn.Module) -> str | None:
    """Why `DecodeEngine` cannot run `tree` (None: it can)."""
    cfg = getattr(tree, "config", None)
    mt = getattr(cfg, "model_type", None)
    fam = FAMILIES.get(mt)
    if fam is None or fam.norm != "rms" or fam.mlp != "gated":
        return f"model_type {mt!r} is not an RMSNorm + gated-MLP family (llama, mistral, qwen2)"
    inner = getattr(tree, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the tree has no model.layers / model.rotary_emb"
    p = next(iter(tree.parameters()), None)
    if p is not None and (p.dtype != torch.float32 or p.device.type != "cpu"):
        return f"the tree's parameters are {p.dtype} on {p.device}; the engine runs float32 on the CPU"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        return f"attention implementation {cfg._attn_implementation!r}"
    return None


class _Layer:
    """One decoder block's tensors and lowered linears."""

    __slots__ = ("ln1", "ln2", "eps1", "eps2", "q", "k", "v", "o", "gate", "up", "down", "act")

    def __init__(self, block: nn.Module):
        at, mlp = block.self_attn, block.mlp
        self.ln1, self.eps1 = block.input_layernorm.weight, block.input_layernorm.variance_epsilon
        self.ln2 = block.post_attention_layernorm.weight
        self.eps2 = block.post_attention_layernorm.variance_epsilon
        self.q, self.k, self.v, self.o = (StepLinear(m) for m in (at.q_proj, at.k_proj, at.v_proj,
                                                                  at.o_proj))
        self.gate, self.up, self.down = (StepLinear(m) for m in (mlp.gate_proj, mlp.up_proj,
                                                                 mlp.down_proj))
        self.act = mlp.act_fn


def _rmsnorm(h: Tensor, w: Tensor, eps: float) -> Tensor:
    """transformers' RMSNorm, op for op (float32)."""
    var = h.pow(2).mean(-1, keepdim=True)
    return w * (h * torch.rsqrt(var + eps))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeEngine:
    """Prefill and decode over a static KV cache for one transformers tree.

    ``engine.reset(batch)`` starts sequences; ``engine.step(ids)`` appends ids [B, T] at the
    current position and returns float32 logits [B, T', V] for the last token (or every
    token with ``all_logits=True``); ``engine.position`` is how many tokens are cached.
    """

    def __init__(self, tree: nn.Module):
        why = engine_unsupported(tree)
        if why is not None:
            raise NotImplementedError(f"the decode engine cannot run this model: {why}")
        cfg = tree.config
        inner = tree.model
        self.tree = tree
        self.config = cfg
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(b) for b in inner.layers]
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = StepLinear(tree.lm_head)
        at = inner.layers[0].self_attn
        self.head_dim = at.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scaling = at.scaling
        self.sliding_window = getattr(cfg, "sliding_window", None) if \
            getattr(cfg, "use_sliding_window", True) else None
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.batch = 0
        self.position = 0
        self._k: list[Tensor] = []
        self._v: list[Tensor] = []

    # -- the cache ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._k[0].shape[2] if self._k else 0

    def reset(self, batch: int = 1, capacity: int = CACHE_STEP) -> None:
        """Start `batch` new sequences with room for `capacity` tokens (grown as needed)."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        cap = -(-max(capacity, 1) // CACHE_STEP) * CACHE_STEP
        shape = (batch, self.n_kv, cap, self.head_dim)
        self._k = [torch.zeros(shape) for _ in self.layers]
        self._v = [torch.zeros(shape) for _ in self.layers]
        self.batch, self.position = batch, 0

    def _reserve(self, length: int) -> None:
        if length > self.capacity:
            cap = -(-length // CACHE_STEP) * CACHE_STEP
            grow = (self.batch, self.n_kv, cap - self.capacity, self.head_dim)
            self._k = [torch.cat([c, torch.zeros(grow)], 2) for c in self._k]
            self._v = [torch.cat([c, torch.zeros(grow)], 2) for c in self._v]

    # -- the step -----------------------------------------------------------------------------

    def _check(self, ids: Tensor) -> None:
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"ids must be [batch={self.batch}, tokens], got {tuple(ids.shape)}; "
                             "call reset(batch) to start other sequences")
        end = self.position + ids.shape[1]
        if self.sliding_window is not None and end > self.sliding_window:
            raise NotImplementedError(f"{end} tokens exceed the sliding window "
                                      f"{self.sliding_window}: the engine attends to all of them")

    @torch.no_grad()
    def step(self, ids: Tensor, all_logits: bool = False) -> Tensor:
        """Append ids [B, T]; float32 logits [B, 1 (or T), vocab]."""
        self._check(ids)
        b, t = ids.shape
        p0 = self.position
        self._reserve(p0 + t)
        pos = torch.arange(p0, p0 + t).expand(b, t)
        h = self.embed(ids).float()  # [B, T, D]
        cos, sin = self.rotary(h, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, hd]
        h = h.reshape(b * t, -1)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        end = p0 + t
        mask, causal = None, False
        if t > 1:
            if p0 == 0:
                causal = True
            else:  # a chunk after cached tokens: query i sees keys up to p0 + i
                mask = torch.ones(t, end, dtype=torch.bool).tril(p0)
        for i, L in enumerate(self.layers):
            x = _rmsnorm(h, L.ln1, L.eps1)
            q = L.q(x).view(b, t, nh, hd).transpose(1, 2)
            k = L.k(x).view(b, t, nkv, hd).transpose(1, 2)
            v = L.v(x).view(b, t, nkv, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self._k[i], self._v[i]
            kc[:, :, p0:end] = k
            vc[:, :, p0:end] = v
            a = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask,
                                               is_causal=causal, scale=self.scaling,
                                               enable_gqa=nkv != nh)
            a = a.transpose(1, 2).reshape(b * t, nh * hd)
            h = h + L.o(a)
            x = _rmsnorm(h, L.ln2, L.eps2)
            g = L.gate(x)
            g = L.act(g) * L.up(x)
            h = h + L.down(g)
        self.position = end
        h = h.view(b, t, -1)
        if not all_logits:
            h = h[:, -1:]
        x = _rmsnorm(h.reshape(-1, h.shape[-1]).contiguous(), self.norm_w, self.norm_eps)
        logits = self.lm_head(x)
        return logits.view(b, h.shape[1], -1).clone()
