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


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "rms", "gated", "input_layernorm"),
    Family("mistral", "rms", "gated", "input_layernorm"),
    Family("qwen2", "rms", "gated", "input_layernorm"),
    Family("opt", "layer", "plain", "self_attn_layer_norm"),
)}

#: Architectures tested end to end (config.model_type).
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
