"""Saving a compiled model (loading: `runtime.load`): packed safetensors + ``config.json`` with an
``abqc`` ``quantization_config`` + the tokenizer, in one directory.

Everything is written to a temporary sibling directory that is renamed into place at the
end, so an interrupted save never leaves a half-written model; the weight files carry
sha256 checksums that `load` (and ``from_pretrained``) verify.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..errors import ConfigError
from .layers import config_groups, layer_table
from .hf_quantizer import QUANT_METHOD, AbqcConfig, register, sha256, verify_checksums


def save(cm, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write `cm` (a lowered CompiledModel) to `directory`, replacing it if it exists."""
    from ..version import __version__

    if cm.hf_model is None:
        raise ConfigError("only models compiled with backend='kernels' can be saved "
                          "(a fake-quant graph has no packed weights)")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        layers = layer_table(cm)
        model = cm.hf_model
        floats = [p for p, a in cm.annotations.items() if p not in layers]
        qc = AbqcConfig(layers=layers, version=__version__, config_groups=config_groups(layers),
                        ignore=floats, compile_config=cm.config.to_dict())
        old = getattr(model.config, "quantization_config", None)
        model.config.quantization_config = qc.to_dict()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if old is None:
                del model.config.quantization_config
            else:
                model.config.quantization_config = old
        files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors")
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["quantization_config"]["checksums"] = {f: sha256(tmp / f) for f in files}
        from .hf_guard import guard_config  # plain transformers: an error naming abqc, not random linears
        write_json(cfg_path, guard_config(cfg))
        tok = tokenizer if tokenizer is not None else getattr(cm, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(tmp)
        if directory.exists():
            old_dir = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old_dir / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
