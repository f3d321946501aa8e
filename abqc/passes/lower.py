"""LowerToKernels: each fake-quantized linear becomes one ``abqc::qlinear`` node that runs
a generated kernel on a packed weight.

Before (after QuantDequantFusion)::

    s, z = abqc.choose_qparams(x, qmax, sym, 0)
    xq   = abqc.fake_quant(x, s, z, qmax, 0)
    w    = abqc.dequantize(@codes, @scale, @zero, g)      [+ abqc.add_outliers(w, @idx, @val)]
    y    = aten.linear(xq, w, @bias)

After::

    y    = abqc.qlinear(x, @packed, @scale, @zero_point, @sum, @group_k, @bias, @idx, @val,
                        "n=..,k=..,w=..,a=..,g=..,sym=..,f=bitserial")

The packed tensors live in a `QuantLinear` module at the linear's place in the graph
module, so the same module can be put into the transformers model tree for generation.
Each node records the tuning-log key of the kernel it uses per M bucket
(``node.meta["abqc.kernels"]``); linears the kernels cannot take stay in float, and
the program's `Lowered` fact (and the IR dump) says why.
"""
from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

from ..capture import PATH_KEY, linear_nodes
from ..codegen.packing import WORD
from ..ir import ANNOT_KEY, FLOAT_REASON_KEY, KERNELS_KEY, ROLE_KEY
from ..ops import OPS
from ..runtime import kernels
from ..runtime.format import QuantFormat
from ..runtime.qlinear import QuantLinear
from ..facts import Fused, Lowered, WeightCodes, facts
from .base import Pass
from .graph_utils import erase_if_unused, get_tensor, owner_and_name

log = logging.getLogger("abqc")


class NotLowerable(Exception):
    """Why a linear stays in float."""


def _attr(gm: GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, Node) or node.op != "get_attr":
        raise NotLowerable(f"{node} is computed, not a stored tensor")
    return get_tensor(gm, node.target)


def _match_weight(gm: GraphModule, w: Node):
    """(codes, scale, zero, group, outliers-or-None, nodes to drop) of a weight operand."""
    outliers, drop = None, [w]
    if w.target is OPS.add_outliers.default:
        w, idx, val = w.args
        h = torch.sparse_coo_tensor(_attr(gm, idx), _attr(gm, val),
                                    tuple(_attr(gm, w.args[0]).shape),
                                    check_invariants=True).coalesce()
        outliers, drop = h, drop + [w]
    if w.target is not OPS.dequantize.default:
        raise NotLowerable("its weight is not a dequantize of stored codes")
    codes, scale, zero, gs = w.args
    return _attr(gm, codes), _attr(gm, scale), _attr(gm, zero), gs, outliers, drop


def _match_act(a: Node, abits: int):
    """(float input, symmetric) of an activation operand; checks it is per-token fake quant."""
    if abits == 16:
        if isinstance(a, Node) and a.target is OPS.fake_quant.default:
            raise NotLowerable("its input is fake-quantized but its annotation says float")
        return a, False
    if a.target is not OPS.fake_quant.default:
        raise NotLowerable(f"its input is {a.target}, not a per-token fake_quant")
    x, s, _, qmax, gs = a.args
    cq = s.args[0] if s.target.__name__ == "getitem" else None
    if cq is None or cq.target is not OPS.choose_qparams.default or gs != 0:
        raise NotLowerable("its activation quantizer is not dynamic per token")
    if qmax != (1 << abits) - 1:
        raise NotLowerable(f"activation qmax {qmax} is not a {abits}-bit grid")
    return x, bool(cq.args[2])


def _drop_chain(gm: GraphModule, nodes) -> None:
    """Erase now-unused nodes and whatever only they read (fake_quant -> getitem -> qparams)."""
    todo = list(nodes)
    while todo:
        n = todo.pop(0)
        if not isinstance(n, Node) or n.users or getattr(n, "_erased", False):
            continue
        inputs = [a for a in n.all_input_nodes]
        erase_if_unused(gm, n)
        todo.extend(inputs)


def _alias_outside(gm: GraphModule, target: str, prefix: str) -> str | None:
    """Another name of the tensor at `target` in `gm`, outside module `prefix` (torch.export
    registers a tied tensor under each of its names)."""
    t = get_tensor(gm, target)
    named = list(gm.named_parameters(remove_duplicate=False)) + \
        list(gm.named_buffers(remove_duplicate=False))
    return next((name for name, v in named if v is t and not name.startswith(prefix + ".")), None)


def _report_fallbacks(gm: GraphModule, floats: dict[str, str]) -> None:
    """Quantized linears that no kernel takes (they run fake-quantized in the graph, and
    generate/save refuse them): a warning naming each and why; an error with strict=True."""
    from ..errors import warn_or_raise
    from .base import PassContext

    quantized = {n.meta.get(PATH_KEY): n.meta.get(ANNOT_KEY) for n in gm.graph.nodes
                 if n.meta.get(PATH_KEY) in floats}
    missed = {p: r for p, r in floats.items() if quantized.get(p) is not None}
    if missed:
        cfg = PassContext.current().config
        warn_or_raise(f"LowerToKernels: {len(missed)} quantized linear(s) no kernel takes, left "
                      "fake-quantized in the graph (generate and save refuse them): "
                      + "; ".join(f"{p}: {r}" for p, r in list(missed.items())[:8])
                      + (f"; and {len(missed) - 8} more" if len(missed) > 8 else ""),
                      bool(getattr(cfg, "strict", False)), stacklevel=4)


class LowerToKernels(Pass):
    """Replace fake-quantized linears by ``abqc::qlinear`` on packed weights."""

    requires = (WeightCodes, Fused)
    ensures = (Lowered,)

    def __init__(self, tune: bool | None = None):
        self.tune = kernels.tuning_enabled() if tune is None else tune

    def transform(self, gm: GraphModule) -> GraphModule:
        floats: dict[str, str] = {}
        lowered = 0
        for lin in list(linear_nodes(gm)):
            path = lin.meta.get(PATH_KEY)
            ann = lin.meta.get(ANNOT_KEY)
            if ann is None or ann.weight is None:
                floats[path] = "not quantized (excluded by the config, or lm_head_bits=16)"
                lin.meta[FLOAT_REASON_KEY] = floats[path]
                continue
            try:
                self._lower(gm, lin, ann, path)
                lowered += 1
            except NotLowerable as e:
                floats[path] = str(e)
                lin.meta[FLOAT_REASON_KEY] = str(e)
                log.info("LowerToKernels: %s stays in float: %s", path, e)
        gm.graph.lint()
        gm.recompile()
        facts(gm).add(Lowered(floats))
        log.info("LowerToKernels: %d linears on kernels, %d in float", lowered, len(floats))
        _report_fallbacks(gm, floats)
        return gm

    def _lower(self, gm: GraphModule, lin: Node, ann, path: str) -> None:
        a, w = lin.args[0], lin.args[1]
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        codes, scale, zero, gs, outliers, wdrop = _match_weight(gm, w)
        abits = ann.act.bits if ann.act is not None else 16
        x, sym = _match_act(a, abits)
        if gs and gs % WORD:
            raise NotLowerable(f"group size {gs} is not a multiple of {WORD} (kernels need "
                               "word-aligned groups)")
        n, k = codes.shape
        wbits = max(ann.weight.bits, int(codes.max()).bit_length())
        from ..codegen.compute import KernelShape
        shape = KernelShape(n, k, wbits, abits, gs)
        fmt = QuantFormat(n, k, wbits, abits, gs, sym,
                          kernels.best_formulation(shape, tune_missing=self.tune))
        qmod = QuantLinear.from_codes(fmt, codes, scale, zero, _attr(gm, bias), outliers)
        prefix = w.args[0].target.rpartition(".")[0] if w.target is OPS.dequantize.default \
            else w.args[0].args[0].target.rpartition(".")[0]
        # the packed module will replace the container of codes, grid and bias: nothing else
        # may live there (a tied embedding keeps its float weight beside lm_head's codes)
        ours = set(wdrop) | {w, lin}
        for n in list(gm.graph.nodes):
            if n.op == "get_attr" and n.target.startswith(prefix + ".") and \
                    any(u not in ours for u in n.users):
                alias = _alias_outside(gm, n.target, prefix)
                if alias is None:
                    raise NotLowerable(f"{n.target} in the same module is also read elsewhere "
                                       "and has no other name to be read by")
                # tied weights (lm_head and the embedding): the other reader keeps the float
                # tensor under its other name; the packed module replaces only lm_head
                log.debug("LowerToKernels: %s is read by %s; reading it as %s", n.target,
                          [u.name for u in n.users if u not in ours], alias)
                n.target = alias
        # the qlinear node takes the linear's place; what only the linear read goes; then the
        # packed module replaces the container that held codes, grid and bias
        parent, name = owner_and_name(gm, prefix)
        with gm.graph.inserting_before(lin):
            q = gm.graph.call_function(torch.ops.abqc.qlinear.default, (x,))  # keeps x alive
        lin.replace_all_uses_with(q)
        gm.graph.erase_node(lin)
        _drop_chain(gm, wdrop + [a, bias])
        setattr(parent, name, qmod)
        with gm.graph.inserting_before(q):
            def get(buf):
                if getattr(qmod, buf) is None:
                    return None
                node = gm.graph.get_attr(f"{prefix}.{buf}")
                node.meta["val"] = getattr(qmod, buf)
                return node
            args = (x, get("weight_packed"), get("weight_scale"), get("weight_zero_point"),
                    get("weight_sum"), get("group_k"), get("bias"), get("outlier_indices"),
                    get("outlier_values"), str(fmt))
        q.args = args
        q.meta.update({ROLE_KEY: "qlinear", PATH_KEY: path, ANNOT_KEY: ann,
                       KERNELS_KEY: kernels.prepare(fmt, tune_missing=self.tune)})
        if "val" in lin.meta:
            q.meta["val"] = lin.meta["val"]
