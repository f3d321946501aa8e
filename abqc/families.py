"""Model families: the transformers model types abqc compiles, and what is particular to each.

Everything else is found in the captured graph, not assumed per family: the decoder blocks
(`calibration.blocks.decoder_blocks`), the smoothing pairs (`passes.smooth_pairs`), the
true-sequential order of the linears (`calibration.order`), the output projection
(`passes.annotate.output_path`). A new family is a new entry here, a tiny config in
`frontends/tiny.py`, and a name in `tests/conftest.py`'s FAMILIES, which puts it through the
conformance matrix (`tests/test_conformance.py`) and the pass tests.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One supported ``config.model_type``.

    `norm`: the norm before attention and MLP ("rms": RMSNorm, weight only; "layer": LayerNorm,
    weight and bias; smoothing divides both). `mlp`: "gated" (gate/up -> down) or "plain"
    (fc1 -> fc2). `input_norm`: the attribute of that norm in a decoder block (where smoothing
    folds the attention inputs' scales)."""

    model_type: str
    norm: str
    mlp: str
    input_norm: str
    #: the residual stream's readers and writers in a decoder block, for rotation: each
    #: (norm, the linears it feeds, the linear that writes back to the residual)
    residual: tuple = ()
    final_norm: str = ""


_LLAMA_LIKE = dict(norm="rms", mlp="gated", input_norm="input_layernorm", final_norm="model.norm",
                   residual=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                                  "self_attn.v_proj"), "self_attn.o_proj"),
                             ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"),
                              "mlp.down_proj")))

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", **_LLAMA_LIKE),
    Family("mistral", **_LLAMA_LIKE),
    Family("qwen2", **_LLAMA_LIKE),
    Family("opt", "layer", "plain", "self_attn_layer_norm"),  # LayerNorm: no rotation
)}

#: Architectures tested end to end (config.model_type).
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
