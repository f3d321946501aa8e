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
from .facts import CalibrationStats, Lowered, Source, facts
from .ir import ANNOT_KEY, format_graph, is_qlinear


def causal_lm_loss(logits: torch.Tensor, labels, shape) -> torch.Tensor:
    """transformers' causal-LM loss: logits at t predict labels at t+1, in float32, mean
    over the labels that are not -100."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() \
            or tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must be an integer tensor shaped like input_ids {tuple(shape)}, "
                         f"got {getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    vocab = logits.shape[-1]
    real = labels[labels != -100]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
        raise ValueError(f"labels hold {bad}, outside [0, {vocab}) (and not -100, the ignored label)")
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), shift.reshape(-1),
                                             ignore_index=-100, reduction="mean")


class CompiledModel(nn.Module):
    """Runs the quantized graph: ``cm(input_ids).logits``.

    Attributes: ``graph_module`` (the IR), ``config`` (the CompileConfig), ``hf_config``
    (the source model's transformers config), ``pass_timings`` ((index, pass, seconds)).
    """

    def __init__(self, graph_module: GraphModule | None, config: CompileConfig, *,
                 tree: nn.Module | None = None, pass_timings=(), saved_layers: dict | None = None,
                 max_seq_len: int | None = None):
        """Either from a compiled program (`graph_module`: the transformers tree is derived
        from it on first use) or from a loaded tree (`tree`: the graph is captured from it
        only when asked for, so loading and generating never re-run torch.export)."""
        super().__init__()
        if graph_module is None and tree is None:
            raise ValueError("a CompiledModel needs a graph module or a model tree")
        if graph_module is not None:
            self.add_module("program", graph_module)
        self.config = config
        self.pass_timings = list(pass_timings)
        # the transformers tree (generation, HF API); kept out of the module tree so its
        # tensors (the program's own) are not listed twice
        self.__dict__["_tree"] = tree
        self.tokenizer = None  # saved beside the weights when set
        self.saved_layers = saved_layers  # the layer table of a loaded model
        self._max_seq_len = max_seq_len

    @property
    def graph_module(self) -> GraphModule:
        """The program: the rewritten FX graph (captured from the tree, once, for a loaded model)."""
        gm = self._modules.get("program")
        if gm is None:
            from .capture import capture
            from .runtime.layers import annotate_from_layers

            gm = capture(self.__dict__["_tree"], self._max_seq_len or self.config.max_seq_len)
            annotate_from_layers(gm, self.saved_layers or {})
            self.add_module("program", gm)
        return gm

    @property
    def hf_model(self) -> nn.Module | None:
        """The transformers model tree running the same program (None for backend='fake_quant',
        which has no packed weights): derived from the graph's tensors, never from the source."""
        tree = self.__dict__["_tree"]
        if tree is None and self.config.backend == "kernels":
            from .runtime.hf_model import transformers_tree

            tree = self.__dict__["_tree"] = transformers_tree(self.graph_module)
        return tree

    @property
    def hf_config(self):
        """The transformers config of the model (the program's source, or the loaded tree's)."""
        tree = self.__dict__["_tree"]
        if tree is not None:
            return tree.config
        src = facts(self.graph_module).get(Source)
        return src.skeleton.config if src is not None else None

    def save(self, directory, tokenizer=None, overwrite: bool = False):
        """Write packed safetensors, config.json (``quantization_config``), the tokenizer and a
        manifest of every file; reload with `abqc.load` or ``AutoModelForCausalLM.from_pretrained``
        after ``import abqc``. `directory` must be new or empty unless `overwrite` (then abqc's
        files there are replaced and other files kept)."""
        from .runtime.save import check_target, save, _target
        check_target(_target(directory), overwrite)  # before anything slow
        if self.hf_model is not None:  # (a fake-quant graph is refused by `save` itself)
            self._check_tree_is_whole("save")
        return save(self, directory, tokenizer, overwrite=overwrite)

    def generate(self, *args, engine: bool = True, **kwargs):
        """transformers' ``generate`` (sampling, streaming, stop strings, batches) on the
        quantized tree, every model call on the decode engine (`abqc.runtime.decode`: a
        static KV cache and the packed linears called without per-module Python). Calls the
        engine cannot run (beam search, padded batches, other families) run on the tree with
        a warning saying why; ``engine=False`` asks for the tree directly."""
        if self.hf_model is None:
            raise RuntimeError("this CompiledModel has no transformers model tree to generate "
                               "with (backend='fake_quant' keeps only the graph)")
        self._check_tree_is_whole("generate")
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if ids is not None:
            self.check_input_ids(ids, "input_ids" if not args else "generate's input")
        elif kwargs.get("inputs_embeds") is None:
            raise TypeError("generate needs input_ids [batch, seq] (or inputs_embeds)")
        if not engine:
            return self.hf_model.generate(*args, **kwargs)
        from .runtime.decode.generate import generate
        return generate(self.hf_model, *args, **kwargs)

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
        low = facts(self.graph_module).get(Lowered)
        floats = low.float_linears if low is not None else {}
        return {p: r for p, r in floats.items() if self.annotations.get(p) is not None}

    def _check_tree_is_whole(self, what: str) -> None:
        """The transformers tree runs the whole program: nothing lives in the graph only."""
        from .runtime.hf_model import tree_gaps

        if self.hf_model is None:
            raise RuntimeError(f"{what} needs the transformers model tree, and this CompiledModel "
                               "has none (backend='fake_quant' keeps only the graph)")
        gaps = tree_gaps(self.hf_model)
        if gaps:
            path, reason = next(iter(gaps.items()))
            raise NotImplementedError(
                f"{what} runs the transformers model tree, but {len(gaps)} part(s) of the "
                f"program are in the graph only and would run unquantized there, e.g. {path}: "
                f"{reason}. Call the model (cm(ids)) for the graph's logits, or compile so that "
                "everything fits the kernels (exclude the linear, change the setting named, or "
                "compile without kv_bits)")

    def to(self, *args, **kwargs) -> "CompiledModel":
        """`nn.Module.to`, plus the devices baked into the captured graph (see
        `capture.retarget_device`): ``cm.to("cuda")`` runs the fake-quant graph on a GPU."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and "program" in self._modules:
            retarget_device(self._modules["program"], device)
        out = super().to(*args, **kwargs)
        tree = self.__dict__["_tree"]
        if tree is not None:
            if "program" in self._modules and self.saved_layers is None:
                self.__dict__["_tree"] = None  # derived from the program: derive it again
            else:
                tree.to(*args, **kwargs)  # a loaded tree owns its tensors
        return out

    #: keyword arguments `forward` takes besides input_ids (others are refused, never dropped)
    FORWARD_KWARGS = ("attention_mask", "labels", "use_cache", "return_dict", "past_key_values")

    def _vocab_size(self) -> int | None:
        cfg = self.hf_config
        return getattr(cfg, "vocab_size", None) if cfg is not None else None

    def check_input_ids(self, input_ids, what: str = "input_ids", max_batch: int | None = None):
        """Refuse input_ids the model cannot take, naming the value: a 2-D integer tensor
        [batch, seq] of ids in [0, vocab_size), batch and seq at least 1."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of token ids [batch, seq], got "
                            f"{type(input_ids).__name__}: {input_ids!r:.80}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"{what} has dtype {input_ids.dtype}; token ids are an integer tensor "
                            "(torch.long), e.g. tokenizer(text, return_tensors='pt').input_ids")
        if input_ids.dim() != 2:
            raise ValueError(f"{what} has shape {tuple(input_ids.shape)}; pass a 2-D tensor "
                             f"[batch, seq]{' (ids[None] for one sequence)' if input_ids.dim() == 1 else ''}")
        if 0 in input_ids.shape:
            raise ValueError(f"{what} has shape {tuple(input_ids.shape)}: it is empty; pass at "
                             "least one token per sequence")
        if max_batch is not None and input_ids.shape[0] > max_batch:
            raise ValueError(f"{what} has batch {input_ids.shape[0]}, more than the {max_batch} "
                             "the captured graph takes; split it into smaller batches")
        if input_ids.device.type == "meta":  # shapes only (cm.to("meta")): no values to check
            return
        vocab = self._vocab_size()
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what} holds token id {bad}, outside the vocabulary [0, {vocab}) "
                             "of this model; was it tokenized for another model?")

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """Logits of the quantized graph (and, with ``labels``, the causal-LM loss as
        transformers computes it: next-token cross entropy, ``-100`` ignored)."""
        from .capture import MAX_BATCH

        if kwargs.get("inputs_embeds") is not None:
            raise NotImplementedError(
                "inputs_embeds is not supported by the compiled graph, which takes input_ids; "
                "run cm.hf_model(inputs_embeds=...) (the same quantized linears) instead")
        unknown = sorted(k for k, v in kwargs.items() if k not in self.FORWARD_KWARGS
                         and not (k == "inputs_embeds" and v is None))
        if unknown:
            raise TypeError(f"CompiledModel.forward got unexpected argument(s) {unknown}; it takes "
                            f"input_ids and {list(self.FORWARD_KWARGS)} (use cm.hf_model for the "
                            "full transformers signature)")
        if input_ids is None:
            raise TypeError("CompiledModel.forward needs input_ids [batch, seq]")
        self.check_input_ids(input_ids, max_batch=MAX_BATCH)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask has shape {tuple(getattr(mask, 'shape', ()))}, "
                                 f"input_ids {tuple(input_ids.shape)}: they must match")
            if not bool(mask.all()):
                raise NotImplementedError("padded batches (attention_mask with zeros) are not "
                                          "supported by the captured graph yet; pass unpadded input_ids")
        if kwargs.get("past_key_values") is not None:
            raise NotImplementedError("past_key_values: the compiled graph has no KV cache; use "
                                      "cm.generate (or cm.hf_model) for cached decoding")
        logits = self.graph_module(input_ids)
        labels = kwargs.get("labels")
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, input_ids.shape)
        return CausalLMOutput(loss=loss, logits=logits)

    @property
    def annotations(self) -> dict[str, LinearAnnotation | None]:
        """Module path -> quantization of every linear (None: kept in float)."""
        return {n.meta.get(PATH_KEY) or module_path(n): n.meta.get(ANNOT_KEY)
                for n in self.graph_module.graph.nodes if is_linear(n) or is_qlinear(n)}

    @property
    def calibration_stats(self) -> dict[str, dict]:
        """Module path -> solver stats (method, rel_error, seconds, notes) of calibrated linears."""
        st = facts(self.graph_module).get(CalibrationStats)
        return dict(st.linears) if st is not None else {}

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

    def report(self):
        """Bits per weight with scales, MB, seconds per pass (`abqc.report.Report`;
        ``str()`` of it is the one-line summary ``abqc.compile`` logs)."""
        from .report import report
        return report(self)

    def extra_repr(self) -> str:
        return self.summary()
