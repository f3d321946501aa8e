"""CompiledModel: the result of `abqc.compile`, an nn.Module over the rewritten graph."""
from __future__ import annotations

import sys
from typing import TextIO

import torch
from torch import nn
from torch.fx import GraphModule
from transformers.modeling_outputs import CausalLMOutput

from .capture import PATH_KEY, is_linear, module_path, retarget_device
from .config import CompileConfig, LinearAnnotation
from .ir import ANNOT_KEY, format_graph, is_qlinear


class CompiledModel(nn.Module):
    """Runs the quantized graph: ``cm(input_ids).logits``.

    Attributes: ``graph_module`` (the IR), ``config`` (the CompileConfig), ``hf_config``
    (the source model's transformers config), ``pass_timings`` ((index, pass, seconds)).
    """

    def __init__(self, graph_module: GraphModule, config: CompileConfig, hf_config=None,
                 pass_timings=(), hf_model: nn.Module | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.hf_config = hf_config
        self.pass_timings = list(pass_timings)
        # the transformers model with the same QuantLinear modules (generation, HF API);
        # kept out of the module tree so parameters are not listed twice
        self.__dict__["hf_model"] = hf_model
        self.tokenizer = None  # saved beside the weights when set
        self.saved_layers: dict | None = None  # the layer table of a loaded model

    def save(self, directory, tokenizer=None):
        """Write packed safetensors, config.json (``quantization_config``) and the tokenizer;
        reload with `abqc.load` or ``AutoModelForCausalLM.from_pretrained`` after ``import abqc``."""
        from .runtime.save import save
        self._check_tree_is_whole("save")
        return save(self, directory, tokenizer)

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` (KV cache, sampling, streaming) on the quantized tree."""
        if self.hf_model is None:
            raise RuntimeError("this CompiledModel has no transformers model tree to generate "
                               "with (backend='fake_quant' keeps only the graph)")
        self._check_tree_is_whole("generate")
        return self.hf_model.generate(*args, **kwargs)

    def fake_quant_model(self) -> nn.Module:
        """The transformers tree with each kernel-backed linear replaced by a torch module
        computing the same fake-quant function (`abqc.runtime.reference.FakeQuantLinear`):
        rounded as the integer kernels round, so logits and greedy tokens match them bit for
        bit. A check of the kernels, and a way to run the model where they cannot."""
        if self.hf_model is None:
            raise RuntimeError("this CompiledModel has no transformers model tree "
                               "(backend='fake_quant' keeps only the graph)")
        from .runtime.reference import fake_quant_model
        return fake_quant_model(self.hf_model)

    def unlowered_linears(self) -> dict[str, str]:
        """Path -> reason of linears quantized in the graph that the kernels could not take:
        the graph runs them fake-quantized, the transformers tree has no kernel for them."""
        floats = self.graph_module.meta.get("abqc.float_linears", {})
        return {p: r for p, r in floats.items() if self.annotations.get(p) is not None}

    def _check_tree_is_whole(self, what: str) -> None:
        """The transformers tree carries the quantized linears, not graph-only rewrites."""
        missing = self.unlowered_linears()
        if missing:
            path, reason = next(iter(missing.items()))
            raise NotImplementedError(
                f"{what} runs the transformers model tree, but {len(missing)} quantized "
                f"linear(s) could not be lowered to kernels and would run unquantized there, "
                f"e.g. {path}: {reason}. Call the model (cm(ids)) for the fake-quant logits, "
                "or compile so that every quantized linear fits a kernel (exclude it, or change "
                "the setting named)")
        if getattr(self.config, "kv_bits", 16) != 16:
            raise NotImplementedError(
                f"{what} runs the transformers model tree, which has the quantized linears but "
                f"not the attention quantization of kv_bits={self.config.kv_bits} (it lives in "
                "the graph only); call the model (cm(ids)) for logits, or compile without kv_bits")

    def to(self, *args, **kwargs) -> "CompiledModel":
        """`nn.Module.to`, plus the devices baked into the captured graph (see
        `capture.retarget_device`): ``cm.to("cuda")`` runs the fake-quant graph on a GPU."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            retarget_device(self.graph_module, device)
        return super().to(*args, **kwargs)

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
