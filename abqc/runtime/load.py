"""Loading a saved model: the transformers tree loads the packed tensors and owns them;
the graph is captured from it only when asked for."""
from __future__ import annotations

import os
from pathlib import Path

from ..compiled import CompiledModel
from ..config import CompileConfig
from ..errors import ConfigError
from .hf_quantizer import QUANT_METHOD, register, verify_saved
from .manifest import read_json


def load(directory: str | os.PathLike, max_seq_len: int | None = None):
    """A CompiledModel from a directory written by `save`: the loaded transformers tree owns
    every tensor; the graph is captured from it only when asked for (``cm(ids)``,
    ``cm.graph_module``), so loading and generating never run torch.export."""
    import torch
    from transformers import AutoModelForCausalLM

    if not isinstance(directory, (str, os.PathLike)):
        raise ConfigError(f"directory={directory!r} is not a path to a saved abqc model")
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory: not a saved abqc model")
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{directory} has no config.json: not a saved abqc model")
    cfg = read_json(cfg_path, "config.json")
    qc = (cfg.get("quantization_config") if isinstance(cfg, dict) else None) or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ConfigError(f"{directory} is not an abqc model (quant_method="
                          f"{qc.get('quant_method') if isinstance(qc, dict) else qc!r}, "
                          f"expected {QUANT_METHOD!r})")
    verify_saved(directory, qc)
    register()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    compile_cfg = {k: v for k, v in qc.get("compile_config", {}).items()
                   if k not in ("dump_ir", "print_ir")}
    config = CompileConfig.from_options(**compile_cfg) if compile_cfg else CompileConfig()
    cm = CompiledModel(None, config, tree=model, saved_layers=dict(qc.get("layers", {})),
                       max_seq_len=max_seq_len)
    tok_files = ("tokenizer.json", "tokenizer_config.json")
    if any((directory / f).exists() for f in tok_files):
        from transformers import AutoTokenizer
        cm.tokenizer = AutoTokenizer.from_pretrained(directory)
    return cm
