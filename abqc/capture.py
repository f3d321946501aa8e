"""Capture: a Hugging Face causal LM becomes a torch FX graph via `torch.export`.

The model is wrapped so that the graph takes ``input_ids`` and returns logits only
(a KV cache in the output breaks export), exported with ``strict=False`` and dynamic
batch and sequence dims, and ``ep.module()`` is the IR every pass works on.
"""
from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from .errors import UnsupportedModelError
from .facts import Source, facts

log = logging.getLogger("abqc")

#: The wrapper's attribute holding the model; stripped from module paths.
ROOT = "m"
MAX_BATCH = 64

#: node.meta key holding a linear's module path.
PATH_KEY = "abqc.path"

from .families import SUPPORTED_MODEL_TYPES  # noqa: E402  (re-exported: where a family is declared)


class LogitsOnly(nn.Module):
    """`forward(input_ids) -> logits`: the signature torch.export captures."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, ROOT, model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self, ROOT)(input_ids=input_ids, use_cache=False).logits


def check_model(model: nn.Module) -> str:
    """Raise a clear error for models abqc cannot compile; return the model type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face causal LM (no config.model_type); "
            f"pass a transformers model of type {list(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} ({type(model).__name__}) is not supported; "
            f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    if not any(isinstance(m, nn.Linear) or type(m).__name__ == "QuantLinear"
               for m in model.modules()):
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(meta)} tensors on the meta device (e.g. {meta[0]!r}): "
            "its weights were never loaded (init_empty_weights, device='meta' or a device_map "
            "that offloads); load the model with its weights, e.g. "
            "AutoModelForCausalLM.from_pretrained(path), before compiling")
    return model_type


def capture(model: nn.Module, max_seq_len: int | None = None) -> GraphModule:
    """Export `model` to an FX GraphModule with dynamic batch (1..64) and sequence dims.

    The graph shares parameter storage with `model`: passes must not edit weights in place.
    """
    check_model(model)
    ctx = max_seq_len or getattr(model.config, "max_position_embeddings", None) or 4096
    model.eval()
    example = torch.zeros(2, min(16, ctx), dtype=torch.long)
    dims = {"input_ids": {0: Dim("batch", min=1, max=MAX_BATCH), 1: Dim("seq", min=1, max=ctx)}}
    t0 = time.perf_counter()
    with torch.no_grad():
        try:
            ep = torch.export.export(LogitsOnly(model), (example,), strict=False, dynamic_shapes=dims)
        except torch._dynamo.exc.UserError as e:
            if "Constraints violated" not in str(e):
                raise
            ep = _export_auto(model, example, e)
    gm = ep.module()
    facts(gm).add(Source(skeleton_of(model), ctx, model.config.model_type))
    for node in gm.graph.nodes:  # linears, and already-lowered linears of a loaded model
        if is_linear(node) or str(node.target) == "abqc.qlinear.default":
            node.meta[PATH_KEY] = module_path(node)
    log.info("captured %s: %d nodes, %d linears in %.1fs", type(model).__name__,
             len(gm.graph.nodes), sum(1 for _ in linear_nodes(gm)), time.perf_counter() - t0)
    return gm


def skeleton_of(model: nn.Module) -> nn.Module:
    """`model`'s module tree (classes, config, generation config, every non-tensor attribute)
    with each parameter and buffer replaced by a meta tensor of its shape and dtype.

    The program keeps this instead of the model: the transformers tree is rebuilt from it
    around the program's own tensors (`runtime.hf_model.transformers_tree`), so nothing
    reads the source model's tensors after capture. Tied tensors stay tied (one meta tensor).
    """
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _export_auto(model: nn.Module, example: torch.Tensor, refused: Exception):
    """Export again with ``Dim.AUTO`` dims, for torch versions whose shape solver cannot
    prove a guard over the declared range (torch 2.11 with transformers 5.17 refuses
    ``min(16*seq, 32*seq) == 16*seq``). The result must still be dynamic in both dims."""
    log.warning("export refused the declared dynamic dims (%s); retrying with Dim.AUTO",
                str(refused).strip().splitlines()[0])
    auto = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}
    ep = torch.export.export(LogitsOnly(model), (example,), strict=False, dynamic_shapes=auto)
    name = ep.graph_signature.user_inputs[0]
    shape = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name).meta["val"].shape
    static = [i for i, d in enumerate(shape) if not isinstance(d, torch.SymInt)]
    if static:
        raise UnsupportedModelError(
            f"torch.export specialized input_ids dims {static} of {tuple(shape)} to the example's "
            f"sizes, so the graph would run at one shape only; the first export failed with: "
            f"{refused}") from refused
    return ep


def is_linear(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.linear.default


def linear_nodes(gm: GraphModule):
    """The `aten.linear` nodes of the graph, in execution order."""
    return [n for n in gm.graph.nodes if is_linear(n)]


def strip_root(name: str) -> str:
    return name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else name


def module_path(node: torch.fx.Node) -> str | None:
    """The model's module path of a linear node (``model.layers.3.mlp.down_proj``).

    Recorded at capture; else taken from the weight's attribute name or nn_module_stack.
    """
    if PATH_KEY in node.meta:
        return node.meta[PATH_KEY]
    if is_linear(node):
        w = node.args[1]
        if isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target.endswith(".weight"):
            return strip_root(w.target[: -len(".weight")])
    stack = node.meta.get("nn_module_stack")
    if stack:
        return strip_root(list(stack.values())[-1][0])
    return None


def retarget_device(gm: GraphModule, device: torch.device | str) -> GraphModule:
    """Point the devices `torch.export` baked into the graph (``arange(device=cpu)``, mask
    casts, metadata asserts) at `device`, in place. Moving the parameters is not enough
    to run a captured graph elsewhere: these constants would still build CPU tensors."""
    device = torch.device(device)

    def swap(v):
        if isinstance(v, torch.device):
            return device
        if isinstance(v, (tuple, list)):
            return type(v)(swap(x) for x in v)
        return v

    changed = 0
    for node in gm.graph.nodes:
        args, kwargs = swap(node.args), {k: swap(v) for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
    return gm
