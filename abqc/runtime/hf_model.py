"""The transformers model tree with the lowered linears in place, for generation.

`quantized_model` copies the module structure of the source model, shares every float
parameter with it (no second copy of embeddings and norms), and puts the graph's
`QuantLinear` modules (the very same objects, so the same packed tensors) where the
quantized `nn.Linear`s were. `generate`, KV caches, streaming and the rest of the
transformers API then run every quantized linear on the kernels.
"""
from __future__ import annotations

import copy

from torch import nn
from torch.fx import GraphModule

from ..capture import PATH_KEY
from ..ir import is_qlinear
from .qlinear import QuantLinear


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


def quantized_model(model: nn.Module, modules: dict[str, QuantLinear]) -> nn.Module:
    """A copy of `model` whose linears at `modules`' paths are those QuantLinears."""
    replace = {}
    for path, q in modules.items():
        lin = model.get_submodule(path)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{path} is a {type(lin).__name__}, not an nn.Linear")
        replace[lin] = q
    return copy_replacing(model, replace)
