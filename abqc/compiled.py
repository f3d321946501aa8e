"""CompiledModel: the result of `abqc.compile`, an nn.Module over the rewritten graph."""
from __future__ import annotations

import sys
from typing import TextIO

import torch
from torch import nn
from torch.fx import GraphModule
from transformers.modeling_outputs import CausalLMOutput

from .capture import PATH_KEY, is_linear, module_path
from .config import CompileConfig, LinearAnnotation
from .ir import ANNOT_KEY, format_graph, is_qlinear


class CompiledModel(nn.Module):
    """Runs the quantized graph: ``cm(input_ids).logits``.

    Attributes: ``graph_module`` (the IR), ``config`` (the CompileConfig), ``hf_config``
    (the source model's transformers config), ``pass_timings`` ((index, pass, seconds)).
    """

    def __init__(self, graph_module: GraphModule, config: CompileConfig, hf_config=None,
                 pass_timings=()):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.hf_config = hf_config
        self.pass_timings = list(pass_timings)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> CausalLMOutput:
        if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
            raise NotImplementedError("padded batches (attention_mask with zeros) are not "
                                      "supported by the captured graph yet; pass unpadded input_ids")
        return CausalLMOutput(logits=self.graph_module(input_ids))

    @property
    def annotations(self) -> dict[str, LinearAnnotation | None]:
        """Module path -> quantization of every linear (None: kept in float)."""
        return {n.meta.get(PATH_KEY) or module_path(n): n.meta.get(ANNOT_KEY)
                for n in self.graph_module.graph.nodes if is_linear(n) or is_qlinear(n)}

    @property
    def calibration_stats(self) -> dict[str, dict]:
        """Module path -> solver stats (method, rel_error, seconds, notes) of calibrated linears."""
        return dict(self.graph_module.meta.get("abqc.calib_stats", {}))

    def ir(self) -> str:
        return format_graph(self.graph_module, "abqc IR (compiled)")

    def print_ir(self, file: TextIO | None = None) -> None:
        """Print the graph: one line per node, each linear with its path and annotation."""
        print(self.ir(), file=file or sys.stdout)

    def summary(self) -> str:
        anns = self.annotations
        q = sum(a is not None for a in anns.values())
        return (f"CompiledModel: {q}/{len(anns)} linears quantized "
                f"(wbits={self.config.wbits}, abits={self.config.abits}, "
                f"method={self.config.method})")

    def extra_repr(self) -> str:
        return self.summary()
