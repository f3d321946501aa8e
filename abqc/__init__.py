"""abqc: a compiler-style post-training quantization framework for LLMs.

``abqc.compile(model, wbits=6, abits=6)`` captures a Hugging Face causal LM as an FX
graph, runs named passes over it (annotate, insert quant/dequant, calibrate, fuse) and
returns a `CompiledModel`.
"""
from __future__ import annotations

from .version import __version__  # noqa: F401

from . import ops  # noqa: F401  (registers the abqc:: custom ops)
from .api import compile  # noqa: A001
from .compiled import CompiledModel
from .config import CompileConfig, LinearAnnotation, QuantSpec
from .errors import AbqcError, ConfigError, UnsupportedModelError
from .log import set_verbosity
from .runtime import hf_quantizer as _hf_quantizer
from .runtime.load import load

_hf_quantizer.register()  # saved abqc models load with AutoModelForCausalLM.from_pretrained

__all__ = ["compile", "load", "CompiledModel", "CompileConfig", "LinearAnnotation", "QuantSpec",
           "AbqcError", "ConfigError", "UnsupportedModelError", "eval", "set_verbosity",
           "__version__"]


def __getattr__(name):
    # `abqc.eval` imports the data frontends; load it on first use.
    if name == "eval":
        import importlib
        return importlib.import_module(".eval", __name__)
    raise AttributeError(f"module 'abqc' has no attribute {name!r}")
