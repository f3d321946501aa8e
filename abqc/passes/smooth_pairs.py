"""Where per-channel smoothing scales can be folded, found from the graph.

A *smoothing pair* is a source whose output channels can absorb ``1/s`` exactly and the
linears (consumers) that read that output, whose weight columns absorb ``s``:

- ``norm``: the consumers' shared input is ``mul(@norm_weight, x)`` (RMSNorm) or
  ``layer_norm(x, shape, @weight, @bias)``: divide the norm's weight (and bias) by s;
- ``linear``: the input is another linear's output reached through channel-preserving
  ops (views, transposes, GQA's expand/reshape, the value path of attention, an
  elementwise gate ``act(gate) * up``, relu): divide that linear's rows (and bias) by s.
  Under GQA the consumer (o_proj) has ``n_rep`` times the source's (v_proj) channels,
  so one scale serves every query head of a KV group: ``index`` maps consumer input
  channels to source channels.

Linears that share one input share one scale. Folding keeps the float model unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..capture import is_linear, module_path
from .graph_utils import get_tensor, set_buffer

aten = torch.ops.aten

#: Ops that keep each channel's values apart (layout only): a scale passes straight through.
LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.transpose.int, aten.permute.default, aten.unsqueeze.default,
              aten.expand.default, aten.clone.default, aten.contiguous.default,
              aten.alias.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
              aten.dropout.default}
#: Positively homogeneous: relu(x / s) = relu(x) / s for s > 0.
POSITIVE_OPS = {aten.relu.default}
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
_ASSERT = aten._assert_tensor_metadata.default


@dataclass
class SmoothPair:
    kind: str  # "norm" | "linear"
    source: str  # norm module path, or the producing linear's path
    source_weight: str  # get_attr target divided by s (norm weight, or producer weight rows)
    source_bias: str | None
    consumers: list[str]  # linear module paths sharing the input
    consumer_weights: list[str]  # their weight get_attr targets (columns multiplied by s)
    channels: int  # number of scales
    index: torch.Tensor | None = None  # consumer input channel -> scale index (GQA); None: identity

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """The scale per consumer input channel."""
        return s if self.index is None else s[self.index]


def _users(n: Node) -> list[Node]:
    return [u for u in n.users if u.target is not _ASSERT]


def _single_use(n: Node) -> bool:
    return len(_users(n)) == 1


def _linear_behind(start: Node) -> Node | None:
    """The linear whose output reaches `start` through channel-preserving, single-use ops."""
    node = start
    while isinstance(node, Node) and node.op == "call_function":
        if is_linear(node):
            return node if _single_use(node) else None
        if node is not start and not _single_use(node):
            return None
        t = node.target
        if t in LAYOUT_OPS or t in POSITIVE_OPS:
            node = node.args[0]
        elif t in ATTENTION_OPS:
            node = node.args[2]  # the value: out = softmax(.) @ V is linear in V's channels
        elif t is aten.mul.Tensor:
            a, b = node.args
            if not isinstance(b, Node):  # times a constant
                node = a
                continue
            if not isinstance(a, Node):
                node = b
                continue
            direct = [x for x in (a, b) if is_linear(x) and _single_use(x)]
            if len(direct) != 1:  # an elementwise gate needs exactly one linear side
                return None
            node = direct[0]
        else:
            return None
    return None


def _weight_target(lin: Node) -> str | None:
    w = lin.args[1]
    return w.target if isinstance(w, Node) and w.op == "get_attr" else None


def _bias_target(lin: Node) -> str | None:
    b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return b.target if isinstance(b, Node) and b.op == "get_attr" else None


def _head_dim(lin: Node) -> int | None:
    """Head size from the first 4-D view of a projection's output ([b, s, heads, head_dim])."""
    for u in _users(lin):
        val = u.meta.get("val")
        if u.target in LAYOUT_OPS and isinstance(val, torch.Tensor) and val.ndim == 4:
            return int(val.shape[-1])
    return None


def _gqa_index(consumer_k: int, source_n: int, head_dim: int) -> torch.Tensor:
    """Consumer channel (head h, dim d) -> source channel (KV head h // n_rep, dim d)."""
    n_rep = consumer_k // source_n
    c = torch.arange(consumer_k)
    return (c // head_dim // n_rep) * head_dim + c % head_dim


def _norm_source(x: Node) -> tuple[str, str, str | None] | None:
    """(module path, weight target, bias target) if `x` is a norm's output, else None."""
    if x.op != "call_function":
        return None
    if x.target is aten.mul.Tensor:
        for w in x.args:
            val = w.meta.get("val") if isinstance(w, Node) else None
            if isinstance(w, Node) and w.op == "get_attr" and isinstance(val, torch.Tensor) \
                    and val.ndim == 1:
                return w.target.rpartition(".")[0], w.target, None
    if x.target is aten.layer_norm.default:
        w, b = x.args[2], x.args[3] if len(x.args) > 3 else None
        if isinstance(w, Node) and w.op == "get_attr":
            bias = b.target if isinstance(b, Node) and b.op == "get_attr" else None
            return w.target.rpartition(".")[0], w.target, bias
    return None


def _tensor_readers(gm: GraphModule) -> dict[int, set[Node]]:
    """id(tensor) -> the nodes that read it, through any get_attr alias of it."""
    out: dict[int, set[Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out.setdefault(id(get_tensor(gm, n.target)), set()).update(n.users)
    return out


def find_smooth_pairs(gm: GraphModule, paths: set[str] | None = None) -> list[SmoothPair]:
    """Every foldable (source, consumers) pair; consumers restricted to `paths` when given.

    A pair is kept only when every user of the shared input is one of its consumers
    (otherwise the rescaled input would leak into other computations).
    """
    readers = _tensor_readers(gm)
    by_input: dict[Node, list[Node]] = {}
    for n in gm.graph.nodes:
        if is_linear(n) and isinstance(n.args[0], Node) and _weight_target(n):
            by_input.setdefault(n.args[0], []).append(n)
    pairs = []
    for x, lins in by_input.items():
        cpaths = [module_path(n) for n in lins]
        if paths is not None and not all(p in paths for p in cpaths):
            continue
        if set(_users(x)) != set(lins):
            continue
        weights = [_weight_target(n) for n in lins]
        if any(readers[id(get_tensor(gm, w))] - {lin} for w, lin in zip(weights, lins)):
            continue  # a weight read elsewhere too (lm_head tied to the embedding): scaling its
            # columns would change the other reader
        k = int(get_tensor(gm, weights[0]).shape[1])
        norm = _norm_source(x)
        if norm is not None:
            pairs.append(SmoothPair("norm", norm[0], norm[1], norm[2], cpaths, weights, k))
            continue
        src = _linear_behind(x)
        if src is None or not _weight_target(src):
            continue
        n_src = int(get_tensor(gm, _weight_target(src)).shape[0])
        index = None
        if n_src != k:
            hd = _head_dim(src)
            if hd is None or k % n_src or n_src % hd:
                continue
            index = _gqa_index(k, n_src, hd)
        pairs.append(SmoothPair("linear", module_path(src), _weight_target(src), _bias_target(src),
                                cpaths, weights, n_src, index))
    return pairs


def fold_smoothing(gm: GraphModule, pair: SmoothPair, s: torch.Tensor) -> None:
    """Divide the source's channels by `s`, multiply the consumers' columns by it.

    New tensors replace the old ones (the graph shares storage with the user's model).
    """
    s = s.detach().float()
    src = get_tensor(gm, pair.source_weight).detach()
    if pair.kind == "norm":
        set_buffer(gm, pair.source_weight, (src.float() / s).to(src.dtype))
    else:
        set_buffer(gm, pair.source_weight, (src.float() / s[:, None]).to(src.dtype))
    if pair.source_bias:
        b = get_tensor(gm, pair.source_bias).detach()
        set_buffer(gm, pair.source_bias, (b.float() / s).to(b.dtype))
    cols = pair.expand(s)
    for target in pair.consumer_weights:
        w = get_tensor(gm, target).detach()
        set_buffer(gm, target, (w.float() * cols[None, :]).to(w.dtype))
