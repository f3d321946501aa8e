"""AnnotateQuant: decide, per linear, what to quantize and how (no graph rewrite yet)."""
from __future__ import annotations

import logging

from torch.fx import GraphModule

from ..capture import linear_nodes, module_path
from ..config import CompileConfig
from ..ir import ANNOT_KEY
from ..facts import Annotated, QuantDequant, Source, facts
from .base import Pass

log = logging.getLogger("abqc")


def output_path(gm: GraphModule) -> str | None:
    """Module path of the model's output projection (``lm_head``), from the Source skeleton."""
    src = facts(gm).get(Source)
    if src is None or not hasattr(src.skeleton, "get_output_embeddings"):
        return None
    head = src.skeleton.get_output_embeddings()
    return next((name for name, mod in src.skeleton.named_modules() if mod is head), None)


class AnnotateQuant(Pass):
    """Attach a `LinearAnnotation` (or None: stays float) to every linear node.

    Global wbits/abits come from the config; its ``overrides`` (regex -> fields) and
    ``exclude`` (regexes) refine them per module path; the output projection gets
    ``lm_head_bits`` (8 by default; 16 keeps it in float).
    """

    ensures = (Annotated,)
    before = (QuantDequant,)

    def __init__(self, config: CompileConfig):
        self.config = config

    def transform(self, gm: GraphModule) -> GraphModule:
        n_quant = 0
        out = output_path(gm)
        for node in linear_nodes(gm):
            path = module_path(node)
            ann = self.config.annotation_for(path, output=path == out)
            node.meta[ANNOT_KEY] = ann
            n_quant += ann is not None
        if n_quant == 0:
            log.warning("AnnotateQuant: every linear is excluded; nothing will be quantized")
        facts(gm).add(Annotated(n_quant, len(linear_nodes(gm)), out))
        return gm
