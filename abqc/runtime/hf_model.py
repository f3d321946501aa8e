"""The transformers model tree, derived from the program (never from the source model).

The single-store rule: the compiled program (the graph module and its facts) owns every
tensor. `transformers_tree` rebuilds the transformers module tree around those tensors:
the module structure comes from the `Source` fact's skeleton (the captured model's tree
with meta tensors, see `capture.skeleton_of`), every parameter and buffer is the graph's
tensor of the same name (smoothed norms, folded compensation, rotated embeddings: whatever
the passes left there), and each lowered linear is the graph's very `QuantLinear` object.
Generation, saving, `abqc.load` and ``from_pretrained`` all start from this tree, so they
run what the graph runs. What the tree cannot hold (a quantized linear the kernels could
not take, attention quantization that lives in graph nodes) is listed in ``tree.abqc_gaps``
and refused by whatever would run the tree.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import GraphModule

from ..capture import PATH_KEY, ROOT
from ..errors import AbqcError
from ..facts import KVQuant, Lowered, Source, facts
from ..ir import is_qlinear
from .qlinear import QuantLinear

#: Attribute of a derived tree: path -> why that part of the program is not in the tree.
GAPS_ATTR = "abqc_gaps"


class ProgramError(AbqcError):
    """The program and a tree derived from it would disagree."""


def lowered_modules(gm: GraphModule) -> dict[str, QuantLinear]:
    """Module path in the source model -> its QuantLinear in the lowered graph module."""
    out = {}
    for n in gm.graph.nodes:
        if is_qlinear(n):
            prefix = n.args[1].target.rpartition(".")[0]
            out[n.meta[PATH_KEY]] = gm.get_submodule(prefix)
    return out


def copy_replacing(model: nn.Module, replace: dict[nn.Module, nn.Module]) -> nn.Module:
    """A copy of `model`'s module tree that shares every tensor with it (nothing copied)
    and has each module in `replace` swapped for its value."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    for old, new in replace.items():
        memo[id(old)] = new
    return copy.deepcopy(model, memo)


def _graph_tensor(gm: GraphModule, target: str) -> torch.Tensor | None:
    mod = gm
    *parents, name = target.split(".")
    for part in parents:
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    if isinstance(mod, QuantLinear):
        return None
    t = mod._parameters.get(name)
    if t is None:
        t = mod._buffers.get(name)
    return t


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def transformers_tree(gm: GraphModule, lowered: bool = True) -> nn.Module:
    """The transformers model whose every tensor is the program's.

    With ``lowered=True`` each lowered linear is the graph's QuantLinear; with False (a float
    view for calibration, before lowering) linears keep the graph's current float weights.
    """
    src = facts(gm).require(Source, "transformers_tree")
    skel = src.skeleton
    qmods = lowered_modules(gm) if lowered else {}
    memo: dict[int, object] = {}
    gaps: dict[str, str] = {}
    for path, q in qmods.items():
        memo[id(skel.get_submodule(path))] = q
    placed: dict[int, tuple[str, torch.Tensor]] = {}
    missing: list[tuple[str, torch.Tensor]] = []
    untied: dict[str, torch.Tensor] = {}
    named = [(n, t, True) for n, t in skel.named_parameters(remove_duplicate=False)] + \
            [(n, t, False) for n, t in skel.named_buffers(remove_duplicate=False)]
    for name, meta_t, is_param in named:
        owner = name.rpartition(".")[0]
        if any(owner == p or owner.startswith(p + ".") for p in qmods):
            continue  # inside a lowered linear: the QuantLinear holds its own tensors
        real = _graph_tensor(gm, f"{ROOT}.{name}")
        if real is None:
            missing.append((name, meta_t))
            continue
        if tuple(real.shape) != tuple(meta_t.shape):
            raise ProgramError(f"program tensor {name} has shape {tuple(real.shape)}, the model "
                               f"tree expects {tuple(meta_t.shape)}")
        if id(meta_t) in placed:  # tied (lm_head and the embedding): one tensor in both places
            first, t = placed[id(meta_t)]
            if real is not t and not torch.equal(real, t):
                untied[name] = _as_param(real) if is_param else real  # a pass untied them
            continue
        memo[id(meta_t)] = _as_param(real) if is_param else real
        placed[id(meta_t)] = (name, real)
    unlowered = {n.meta[PATH_KEY] for n in gm.graph.nodes if lowered and n.meta.get("abqc") is not None
                 and n.op == "call_function" and n.target is torch.ops.aten.linear.default}
    for name, meta_t in missing:
        owner = name.rpartition(".")[0]
        if id(meta_t) not in placed and owner not in unlowered:  # (those are gaps below)
            gaps[name] = "the program has no tensor of this name (removed by a pass)"
    tree = copy.deepcopy(skel, memo)
    for name, t in untied.items():  # e.g. rotation: E Q for the lookup, E diag(g) Q for lm_head
        owner, _, leaf = name.rpartition(".")
        setattr(tree.get_submodule(owner), leaf, t)
    _untie_lowered(tree, qmods, {n.rpartition(".")[0] for n in untied})
    if lowered:
        low = facts(gm).get(Lowered)
        why = low.float_linears if low is not None else {}
        for n in gm.graph.nodes:
            if n.meta.get("abqc") is not None and n.op == "call_function" \
                    and n.target is torch.ops.aten.linear.default:
                path = n.meta[PATH_KEY]
                gaps[path] = ("quantized in the graph but could not be lowered to a kernel: "
                              + why.get(path, "not lowered"))
        kv = facts(gm).get(KVQuant)
        if kv is not None and kv.bits != 16:
            gaps["attention"] = (f"kv_bits={kv.bits} quantizes attention in graph nodes only "
                                 "(the tree's attention runs in float)")
    tree.__dict__[GAPS_ATTR] = gaps
    return tree.eval()


def _untie_lowered(tree: nn.Module, qmods: dict[str, QuantLinear], untied: set[str]) -> None:
    """A lm_head tied to the embedding in the source is tied no longer when it is lowered
    (packed codes beside the embedding's float weight) or a pass gave it its own values
    (rotation): say so in the tree's config, so that transformers neither re-ties it nor
    expects a tied ``lm_head.weight`` when the saved model loads."""
    tied = getattr(tree, "all_tied_weights_keys", None) or {}
    if not any(k.rpartition(".")[0] in qmods or k.rpartition(".")[0] in untied for k in tied):
        return
    for cfg in {id(c): c for c in (tree.config, tree.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    if hasattr(tree, "get_expanded_tied_weights_keys"):
        tree.all_tied_weights_keys = tree.get_expanded_tied_weights_keys(all_submodels=False)


def tree_gaps(tree: nn.Module) -> dict[str, str]:
    """What of the program a derived tree does not hold (empty: it runs the whole program)."""
    return dict(tree.__dict__.get(GAPS_ATTR, {}))
