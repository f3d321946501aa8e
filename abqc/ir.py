"""A readable text form of abqc's IR: one line per node, with module paths and
quantization annotations, for `print_ir()` and the per-pass dumps."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from .capture import PATH_KEY, is_linear

#: node.meta key of a linear's `LinearAnnotation`.
ANNOT_KEY = "abqc"
#: node.meta key saying what an inserted node is for ("act_quant", "weight_quant", ...).
ROLE_KEY = "abqc.role"
#: node.meta key of a lowered linear's kernels: M bucket -> tuning-log key.
KERNELS_KEY = "abqc.kernels"
#: node.meta key saying why a linear stayed in float after lowering.
FLOAT_REASON_KEY = "abqc.float_reason"


def is_qlinear(node: Node) -> bool:
    """A lowered linear: ``abqc::qlinear`` (matched by name: the op registers on import)."""
    return node.op == "call_function" and str(node.target) == "abqc.qlinear.default"


def _shape(node: Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dt = str(val.dtype).replace("torch.", "")
        return f"{dt}[{', '.join(str(d) for d in val.shape)}]"
    return ""


def _arg(a: Any) -> str:
    if isinstance(a, Node):
        return f"@{a.target}" if a.op == "get_attr" else f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    return repr(a)


def _target(node: Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        return f"{ns}.{name}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    return getattr(t, "__name__", str(t))


def format_node(node: Node) -> str:
    shape = _shape(node)
    head = f"%{node.name}" + (f": {shape}" if shape else "")
    if node.op == "placeholder":
        body = "input"
    elif node.op == "get_attr":
        body = f"param @{node.target}"
    elif node.op == "output":
        return f"return {_arg(node.args[0])}"
    else:
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        body = f"{_target(node)}({', '.join(args)})"
    notes = []
    if (is_linear(node) or is_qlinear(node)) and PATH_KEY in node.meta:
        notes.append(node.meta[PATH_KEY])
        ann = node.meta.get(ANNOT_KEY)
        notes.append(f"[{ann.describe()}]" if ann else "[float]")
        if FLOAT_REASON_KEY in node.meta:
            notes.append(f"float: {node.meta[FLOAT_REASON_KEY]}")
        if KERNELS_KEY in node.meta:
            notes.append("kernels " + " ".join(f"m{b}={k}" for b, k in node.meta[KERNELS_KEY].items()))
    elif ROLE_KEY in node.meta:
        notes.append(f"{node.meta[ROLE_KEY]} of {node.meta.get(PATH_KEY, '?')}")
    return f"{head} = {body}" + (f"    # {'  '.join(notes)}" if notes else "")


def format_graph(gm: GraphModule, title: str | None = None) -> str:
    """The whole graph as text, headed by a summary of its linears."""
    nodes = list(gm.graph.nodes)
    lin = [n for n in nodes if is_linear(n) or is_qlinear(n)]
    quant = [n for n in lin if n.meta.get(ANNOT_KEY)]
    head = [f"# {title}" if title else "# abqc IR",
            f"# {len(nodes)} nodes, {len(lin)} linears, {len(quant)} quantized, "
            f"{sum(is_qlinear(n) for n in lin)} on kernels"]
    return "\n".join(head + [format_node(n) for n in nodes]) + "\n"
