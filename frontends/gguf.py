"""GGUF files: load through transformers (dequantized to float), or convert once to a
safetensors directory that loads in a fraction of the time."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


def load_gguf(path: str | os.PathLike, dtype=torch.float32):
    """(model, tokenizer) from a GGUF file; weights are dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tok


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype=torch.float32) -> Path:
    """Write the GGUF model as safetensors + tokenizer to `out_dir`, atomically."""
    out_dir = Path(out_dir)
    model, tok = load_gguf(path, dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        # the GGUF "quantizer" only marks the source format; the weights are float now
        model.hf_quantizer.remove_quantization_config(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
