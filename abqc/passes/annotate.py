"""AnnotateQuant: decide, per linear, what to quantize and how (no graph rewrite yet)."""
from __future__ import annotations

import logging

from torch.fx import GraphModule

from ..capture import linear_nodes, module_path
from ..config import CompileConfig
from ..ir import ANNOT_KEY
from ..facts import Annotated, QuantDequant, facts
from .base import Pass

log = logging.getLogger("abqc")


class AnnotateQuant(Pass):
    """Attach a `LinearAnnotation` (or None: stays float) to every linear node.

    Global wbits/abits come from the config; its ``overrides`` (regex -> fields) and
    ``exclude`` (regexes; ``lm_head`` by default) refine them per module path.
    """

    ensures = (Annotated,)
    before = (QuantDequant,)

    def __init__(self, config: CompileConfig):
        self.config = config

    def transform(self, gm: GraphModule) -> GraphModule:
        n_quant = 0
        for node in linear_nodes(gm):
            ann = self.config.annotation_for(module_path(node))
            node.meta[ANNOT_KEY] = ann
            n_quant += ann is not None
        if n_quant == 0:
            log.warning("AnnotateQuant: every linear is excluded; nothing will be quantized")
        facts(gm).add(Annotated(n_quant, len(linear_nodes(gm))))
        return gm
