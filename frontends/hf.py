"""Load a causal LM and its tokenizer from wherever it lives."""
from __future__ import annotations

from pathlib import Path

import torch

from abqc.errors import ConfigError

FORMS = ["'default' (embedded SmolLM2-135M-Instruct)", "a local model directory",
         "a .gguf file", "'tiny:<llama|qwen2|mistral|opt>'", "a Hugging Face hub id (online)"]


def load(source: str = "default", dtype=torch.float32):
    """(model in eval mode, tokenizer) for `source`; see `FORMS` for what it may be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "default":
        from .embedded import load_default

        return load_default(dtype)
    if source.startswith("tiny:"):
        from .tiny import byte_tokenizer, tiny_model

        return tiny_model(source.split(":", 1)[1]), byte_tokenizer()
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        from .gguf import load_gguf

        return load_gguf(path, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model source {source!r} is neither a directory with config.json, "
                          f"a .gguf file, nor a reachable hub id ({type(e).__name__}); "
                          f"accepted: {FORMS}") from None
    return model.eval(), tok
