"""The decode step: prefill and decode lowered once over a static KV cache (`DecodeEngine`),
with packed linears called the short way (`StepLinear`), and its bridge into transformers'
``generate`` (`abqc.runtime.decode.generate`)."""
from .engine import DecodeEngine, engine_unsupported
from .linears import StepLinear

__all__ = ["DecodeEngine", "StepLinear", "engine_unsupported"]
