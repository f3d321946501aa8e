"""Rotate: QuaRot's offline rotation of the residual stream, folded into the weights.

With every RMSNorm's scale folded into the linears it feeds (and the norm set to ones),
RMSNorm commutes with any orthogonal Q (it only divides by ||x||, which Q keeps). So the
residual stream can live in a rotated basis at no run-time cost:

    embedding       E   ->  E Q
    readers         W   ->  W diag(g) Q        (q/k/v after the input norm, gate/up, lm_head)
    writers         W   ->  Qᵀ W,  b -> b Q    (o_proj, down_proj)
    norms           g   ->  1

The model computes the same function (to float rounding); the activations the linears see
are rotated, which spreads a few outlier channels over all of them, so per-token activation
grids and per-channel weight grids waste far fewer levels (what makes W4A4 usable).

Q is a randomized Hadamard matrix (Sylvester, times random signs) when the hidden size is a
power of two; otherwise the Kronecker product of the largest power-of-two Hadamard factor
and a random orthogonal matrix of the rest (576 = 64 x 9), both with random signs. A lm_head
tied to the embedding is untied (E Q and E diag(g) Q differ). Runs first, on the float
program; every later pass (smoothing, GPTQ, QuantEase, ABQ, RTN) sees the rotated weights.
"""
from __future__ import annotations

import logging
import math

import torch
from torch.fx import GraphModule

from ..capture import ROOT
from ..errors import ConfigError
from ..facts import QuantDequant, Rotation, SmoothPairs, Source, WeightCodes, facts
from ..families import FAMILIES
from .base import Pass
from .graph_utils import get_tensor, set_buffer

log = logging.getLogger("abqc")
KINDS = ("hadamard",)


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), entries ±1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two orders, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal [n, n] float64 matrix: randomized Hadamard (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    p2 = n & -n  # the largest power of two dividing n
    h = hadamard(p2) / math.sqrt(p2)
    rest = n // p2
    if rest > 1:
        r, _ = torch.linalg.qr(torch.randn(rest, rest, generator=g, dtype=torch.float64))
        h = torch.kron(h.contiguous(), r.contiguous())
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h


class Rotate(Pass):
    """Rotate the residual stream by an orthogonal matrix folded into the weights."""

    requires = (Source,)
    ensures = (Rotation,)
    before = (QuantDequant, WeightCodes, SmoothPairs)  # on the float weights, before smoothing

    def __init__(self, kind: str = "hadamard", seed: int = 0):
        if kind not in KINDS:
            raise ConfigError(f"rotate={kind!r} is not allowed; use one of {list(KINDS)} or None")
        self.kind, self.seed = kind, seed

    def transform(self, gm: GraphModule) -> GraphModule:
        from ..calibration.blocks import decoder_blocks
        from .annotate import output_path

        src = facts(gm).require(Source, self.name)
        fam = FAMILIES.get(src.model_type)
        if fam is None or not fam.residual:
            raise ConfigError(f"rotate={self.kind!r} needs RMSNorm decoder blocks; model_type="
                              f"{src.model_type!r} has {fam.norm if fam else 'unknown'} norms (rotation "
                              f"is supported for {[f for f, v in FAMILIES.items() if v.residual]})")
        skel = src.skeleton
        prefix, blocks = decoder_blocks(skel)
        emb_path = next(n for n, m in skel.named_modules() if m is skel.get_input_embeddings())
        head_path = output_path(gm)
        dim = skel.get_input_embeddings().weight.shape[1]
        q = random_rotation(dim, self.seed)
        self._untie(gm, emb_path, head_path)
        w = lambda path: f"{ROOT}.{path}.weight"  # noqa: E731

        def update(target, fn):
            t = get_tensor(gm, target).detach()
            set_buffer(gm, target, fn(t.double()).to(t.dtype))

        update(w(emb_path), lambda e: e @ q)
        for b in range(len(blocks)):
            for norm, readers, writer in fam.residual:
                self._fold_norm_and_rotate(gm, w(f"{prefix}.{b}.{norm}"),
                                           [w(f"{prefix}.{b}.{r}") for r in readers], q)
                update(w(f"{prefix}.{b}.{writer}"), lambda m: q.T @ m)
                bias = f"{ROOT}.{prefix}.{b}.{writer}.bias"
                if self._has(gm, bias):
                    update(bias, lambda v: v @ q)
        if head_path is not None:
            self._fold_norm_and_rotate(gm, w(fam.final_norm), [w(head_path)], q)
        facts(gm).add(Rotation(self.kind, dim, self.seed, q))
        log.info("rotate: residual stream (%d) rotated by a randomized Hadamard, %d blocks", dim,
                 len(blocks))
        return gm

    @staticmethod
    def _has(gm, target) -> bool:
        try:
            return get_tensor(gm, target) is not None
        except AttributeError:
            return False

    @staticmethod
    def _fold_norm_and_rotate(gm, norm_w: str, readers: list[str], q: torch.Tensor) -> None:
        g = get_tensor(gm, norm_w).detach()
        for r in readers:
            t = get_tensor(gm, r).detach()
            set_buffer(gm, r, ((t.double() * g.double()[None, :]) @ q).to(t.dtype))
        set_buffer(gm, norm_w, torch.ones_like(g))

    @staticmethod
    def _untie(gm: GraphModule, emb_path: str, head_path: str | None) -> None:
        """Give the embedding and lm_head their own tensors and get_attr names: the
        embedding lookup reads ``<embedding>.weight``, lm_head ``<lm_head>.weight``."""
        if head_path is None:
            return
        emb, head = f"{ROOT}.{emb_path}.weight", f"{ROOT}.{head_path}.weight"
        if get_tensor(gm, emb) is not get_tensor(gm, head):
            return
        for n in list(gm.graph.nodes):
            if n.op != "get_attr" or n.target not in (emb, head):
                continue
            for u in list(n.users):
                kind = str(u.target)
                want = emb if "embedding" in kind else head if "linear" in kind else None
                if want is None:
                    raise ConfigError(f"{n.target} is read by {kind}: cannot untie the embedding "
                                      "from lm_head for rotation")
                if want != n.target:
                    with gm.graph.inserting_before(u):
                        alias = gm.graph.get_attr(want)
                    alias.meta.update(n.meta)
                    u.replace_input_with(n, alias)
        t = get_tensor(gm, emb).detach()
        set_buffer(gm, emb, t.clone())
        set_buffer(gm, head, t.clone())
