"""Small helpers for editing an exported GraphModule: parameters and inserted nodes."""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..capture import PATH_KEY
from ..ir import ROLE_KEY


def owner_and_name(gm: GraphModule, target: str) -> tuple[nn.Module, str]:
    """The submodule holding attribute `target` ("a.b.weight" -> (gm.a.b, "weight"))."""
    prefix, _, name = target.rpartition(".")
    mod = gm
    for part in prefix.split(".") if prefix else []:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod, name


def get_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    mod, name = owner_and_name(gm, target)
    return getattr(mod, name)


def set_buffer(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Register (or replace) buffer `target` on the graph module's module tree."""
    mod, name = owner_and_name(gm, target)
    if name in mod._parameters:
        del mod._parameters[name]
    mod.register_buffer(name, value)


def delete_attr(gm: GraphModule, target: str) -> None:
    mod, name = owner_and_name(gm, target)
    for store in (mod._parameters, mod._buffers):
        store.pop(name, None)


def add_param_node(gm: GraphModule, target: str, value: torch.Tensor, before: Node) -> Node:
    """Store `value` as a buffer and return a get_attr node for it, placed before `before`."""
    set_buffer(gm, target, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["val"] = value
    return node


def insert_call(gm: GraphModule, before: Node, op: Any, args: Iterable[Any], role: str,
                path: str | None) -> Node:
    """Insert `op(*args)` before `before`, tagged with its role and module path."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(op, tuple(args))
    node.meta[ROLE_KEY] = role
    if path is not None:
        node.meta[PATH_KEY] = path
    return node


def insert_pair(gm: GraphModule, before: Node, op: Any, args: Iterable[Any], role: str,
                path: str | None) -> tuple[Node, Node]:
    """Insert a call returning a pair, and the two getitem nodes that unpack it."""
    both = insert_call(gm, before, op, args, role, path)
    first = insert_call(gm, before, operator.getitem, (both, 0), role, path)
    second = insert_call(gm, before, operator.getitem, (both, 1), role, path)
    return first, second


def erase_if_unused(gm: GraphModule, node: Node) -> None:
    """Erase a node without users; a get_attr's tensor goes too if nothing else reads it."""
    if node.users:
        return
    target = node.target if node.op == "get_attr" else None
    gm.graph.erase_node(node)
    if target and not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        delete_attr(gm, target)
