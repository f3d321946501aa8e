"""Saving a compiled model (loading: `runtime.load`): packed safetensors + ``config.json`` with an
``abqc`` ``quantization_config`` + the tokenizer + ``abqc_manifest.json``, in one directory.

Saving never destroys what it did not write. Everything is written to a temporary sibling
directory; the target must be new or empty unless ``overwrite=True``, which replaces abqc's
own files there (those its manifest lists, and any the new save writes) and keeps every
other file. The finished directory takes the target's place in one atomic step
(`abqc.atomic.commit_dir`), so an interrupted or killed save leaves the old target or the
new one, whole; what a killed save left beside it is removed by the next save. The manifest
(size and sha256 of every file, config.json included) is what `load` and ``from_pretrained``
verify.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..atomic import commit_dir, staging_dir, write_json
from ..errors import AbqcError, ConfigError
from .layers import config_groups, layer_table
from .hf_quantizer import QUANT_METHOD, AbqcConfig
from .manifest import MANIFEST, loadable, read_json, write_manifest


class SaveTargetError(AbqcError, FileExistsError):
    """The save target holds something abqc would have to destroy."""


def _target(directory: str | os.PathLike) -> Path:
    """The absolute target path (a symlink at the target: the directory it points to)."""
    if not isinstance(directory, (str, os.PathLike)) or str(directory) == "":
        raise ConfigError(f"save directory={directory!r} is not allowed; pass a path such as 'out/w4a8'")
    target = Path(os.path.abspath(directory))
    if target.is_symlink():
        target = target.resolve()
    cwd = Path.cwd().resolve()
    real = target.resolve()
    if real == cwd or real in cwd.parents or real.parent == real:
        raise ConfigError(
            f"save directory={str(directory)!r} is the current directory, one above it or the "
            "root: a save replaces its target directory as a whole; pass a new subdirectory "
            "such as './model'")
    return target


def own_files(target: Path) -> set[str]:
    """Names in an existing `target` that an earlier abqc save wrote (its manifest's files,
    the manifest; for a save from before manifests, its weights)."""
    own = set()
    if (target / MANIFEST).is_file():
        own.add(MANIFEST)
        try:
            files = read_json(target / MANIFEST, "manifest").get("files", {})
            own |= {n.split("/")[0] for n in files if isinstance(n, str)}
        except (ConfigError, AttributeError):
            pass
    try:
        qc = read_json(target / "config.json", "config").get("quantization_config") or {}
        if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
            own |= {"config.json", "model.safetensors.index.json"}
            own |= {p.name for p in target.glob("*.safetensors")}
    except (ConfigError, AttributeError):
        pass
    return own


#: files a save may write (those of a tokenizer vary; `own_files` adds an old save's)
_WRITES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
           MANIFEST, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model"}


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target whose contents a save would destroy, unless `overwrite`."""
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite={overwrite!r} is not allowed; use True or False")
    if not os.path.lexists(target):
        return
    if overwrite:
        if target.is_dir():
            ours = own_files(target) | _WRITES
            odd = sorted(p.name for p in target.iterdir() if p.name not in ours and loadable(p.name))
            if odd:
                raise SaveTargetError(
                    f"{target} holds {odd}, which abqc did not write and a loader would read beside "
                    "the saved model; overwrite=True keeps other files, so remove these or choose "
                    "a new directory")
        return
    if not target.is_dir():
        raise SaveTargetError(f"{target} is a file, not a directory: save refuses to replace it; "
                              "pass overwrite=True to replace it, or choose another path")
    entries = sorted(p.name for p in target.iterdir())
    if entries:
        raise SaveTargetError(
            f"{target} is not empty ({len(entries)} entries, e.g. {entries[:3]}): save refuses "
            "to replace it; pass overwrite=True to replace abqc's files there (other files are "
            "kept), or choose a new directory")


def save(cm, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `cm` (a lowered CompiledModel) to `directory`: a new or empty directory, or,
    with ``overwrite=True``, one whose abqc files are replaced (other files kept)."""
    from ..version import __version__

    if cm.hf_model is None:
        raise ConfigError("only models compiled with backend='kernels' can be saved "
                          "(a fake-quant graph has no packed weights)")
    target = _target(directory)
    check_target(target, overwrite)
    tmp = staging_dir(target)
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
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["quantization_config"].pop("checksums", None)  # the manifest covers every file
        cfg["quantization_config"]["manifest"] = MANIFEST
        from .hf_guard import guard_config  # plain transformers: an error naming abqc, not random linears
        write_json(cfg_path, guard_config(cfg))
        tok = tokenizer if tokenizer is not None else getattr(cm, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(tmp)
        from ..recipes import write_recipe  # recipe.json: `abqc compile --recipe` reproduces it
        write_recipe(tmp, cm.config, getattr(cm, "source_spec", None))
        write_manifest(tmp)
        keep = []
        if os.path.lexists(target):
            check_target(target, overwrite)  # again: it may have been filled meanwhile
            if target.is_dir() and not target.is_symlink():
                ours = own_files(target) | {p.name for p in tmp.iterdir()}
                keep = sorted(p.name for p in target.iterdir() if p.name not in ours)
        commit_dir(tmp, target, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(directory)
