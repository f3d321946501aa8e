"""Saving and loading a compiled model: packed safetensors + ``config.json`` with an
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
from .format import QuantFormat
from .hf_quantizer import QUANT_METHOD, AbqcConfig, register, sha256, verify_checksums


def _weights_spec(fmt: QuantFormat, ann) -> dict[str, Any]:
    w = {"num_bits": fmt.wbits, "type": "int", "symmetric": bool(ann and ann.weight.symmetric),
         "strategy": "group" if fmt.group_size else "channel", "group_size": fmt.group_size or None}
    if ann is not None and ann.weight.qmax != (1 << fmt.wbits) - 1:
        w["levels"] = ann.weight.qmax + 1  # e.g. the 5-level "2*" grid stored in 3 bits
    return w


def layer_table(cm) -> dict[str, dict[str, Any]]:
    """Path -> packed format and quantization of every lowered linear of `cm`."""
    from ..ir import ANNOT_KEY, is_qlinear
    from ..capture import PATH_KEY

    if getattr(cm, "saved_layers", None):
        return dict(cm.saved_layers)
    out = {}
    for n in cm.graph_module.graph.nodes:
        if not is_qlinear(n):
            continue
        fmt, ann = QuantFormat.parse(n.args[-1]), n.meta.get(ANNOT_KEY)
        out[n.meta[PATH_KEY]] = {
            "format": str(fmt), "wbits": fmt.wbits, "abits": fmt.abits,
            "group_size": fmt.group_size, "act_symmetric": fmt.act_symmetric,
            "weights": _weights_spec(fmt, ann), "method": ann.method if ann else None,
            "bias": n.args[6] is not None,
            "outliers": 0 if n.args[7] is None else int(n.args[7].meta["val"].shape[1])}
    return out


def _config_groups(layers: dict[str, dict]) -> dict[str, dict]:
    """compressed-tensors-style groups: linears with one (weights, activations) scheme."""
    groups: dict[str, dict] = {}
    for path, spec in layers.items():
        acts = None if spec["abits"] == 16 else {
            "num_bits": spec["abits"], "type": "int", "symmetric": spec["act_symmetric"],
            "strategy": "token", "dynamic": True}
        key = json.dumps([spec["weights"], acts], sort_keys=True)
        g = groups.setdefault(key, {"targets": [], "weights": spec["weights"],
                                    "input_activations": acts})
        g["targets"].append(path)
    return {f"group_{i}": g for i, g in enumerate(groups.values())}


def save(cm, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write `cm` (a lowered CompiledModel) to `directory`, replacing it if it exists."""
    import abqc

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
        qc = AbqcConfig(layers=layers, version=abqc.__version__, config_groups=_config_groups(layers),
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


def annotate_from_layers(gm, layers: dict[str, dict]) -> None:
    """Give the re-captured qlinear nodes their annotations back, from the layer table."""
    from ..capture import PATH_KEY
    from ..config import LinearAnnotation, QuantSpec
    from ..ir import ANNOT_KEY, is_qlinear

    for n in gm.graph.nodes:
        spec = layers.get(n.meta.get(PATH_KEY)) if is_qlinear(n) else None
        if spec is None:
            continue
        w = spec["weights"]
        weight = QuantSpec(bits=spec["wbits"], symmetric=w["symmetric"],
                           granularity="group" if spec["group_size"] else "channel",
                           group_size=spec["group_size"])
        act = None if spec["abits"] == 16 else QuantSpec(
            bits=spec["abits"], symmetric=spec["act_symmetric"], granularity="token", dynamic=True)
        n.meta[ANNOT_KEY] = LinearAnnotation(n.meta[PATH_KEY], weight, act, spec.get("method") or "rtn")


def load(directory: str | os.PathLike, max_seq_len: int | None = None):
    """A CompiledModel from a directory written by `save`: the loaded transformers tree owns
    every tensor; the graph is captured from it only when asked for (``cm(ids)``,
    ``cm.graph_module``), so loading and generating never run torch.export."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..compiled import CompiledModel
    from ..config import CompileConfig

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{directory} has no config.json: not a saved abqc model")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON ({e}): the file is damaged") from None
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ConfigError(f"{directory} is not an abqc model (quant_method="
                          f"{qc.get('quant_method')!r}, expected {QUANT_METHOD!r})")
    verify_checksums(directory, qc.get("checksums", {}))
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
