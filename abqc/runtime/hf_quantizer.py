"""transformers integration: ``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved
abqc model after ``import abqc``.

`AbqcConfig` is the ``quantization_config`` of the saved ``config.json``
(``quant_method: "abqc"``); `AbqcHfQuantizer` puts a `QuantLinear` of the recorded format
at every quantized linear's path before the packed tensors load into it, and checks the
weight files against the checksums written at save time.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ConfigError
from . import hf_guard
from .format import QuantFormat
from .qlinear import QuantLinear

QUANT_METHOD = "abqc"


class CorruptCheckpointError(ConfigError):
    """A saved abqc model whose files do not match what was written."""


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(directory: str | os.PathLike, checksums: dict[str, str]) -> None:
    """Raise `CorruptCheckpointError` naming the first file that is missing or altered."""
    for name, digest in checksums.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CorruptCheckpointError(f"{path} is missing: the saved model is incomplete")
        got = sha256(path)
        if got != digest:
            raise CorruptCheckpointError(
                f"{path} does not match its checksum (sha256 {got[:12]}..., saved {digest[:12]}...): "
                "the file is truncated or was modified after abqc saved it; save the model again")


class AbqcConfig(QuantizationConfigMixin):
    """``quantization_config`` of an abqc checkpoint. ``layers`` maps each quantized linear's
    path to its packed format and quantization (bits, group size, symmetry, method)."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, version: str = "",
                 config_groups: dict | None = None, ignore: list[str] | None = None,
                 compile_config: dict | None = None, checksums: dict[str, str] | None = None,
                 format: str = "abqc-packed-v1", **kwargs):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.version = version
        self.layers = dict(layers or {})
        self.config_groups = dict(config_groups or {})
        self.ignore = list(ignore or [])
        self.compile_config = dict(compile_config or {})
        self.checksums = dict(checksums or {})
        for k, v in kwargs.items():
            if k != "quant_method":
                setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["quant_method"] = QUANT_METHOD
        return d


def replace_linears(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Put an empty QuantLinear of the recorded format at every path in `layers`."""
    for path, spec in layers.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, name, None)
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise CorruptCheckpointError(f"quantization_config names {path!r}, which is "
                                         f"{type(old).__name__} in this model, not a linear")
        fmt = QuantFormat.parse(spec["format"])
        setattr(parent, name, QuantLinear(fmt, bias=spec.get("bias", False),
                                          outliers=spec.get("outliers", 0)))


class AbqcHfQuantizer(HfQuantizer):
    """Loads abqc checkpoints: packed linears on abqc's kernels (CPU)."""

    requires_calibration = True  # only pre-quantized checkpoints load

    def validate_environment(self, *args, **kwargs):
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        if checkpoint_files:
            verify_checksums(os.path.dirname(checkpoint_files[0]), cfg.checksums)
        replace_linears(model, cfg.layers)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.realign()
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make ``quant_method: "abqc"`` and the guarded ``model_type`` known to transformers
    (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AbqcConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AbqcHfQuantizer)
    hf_guard.register()  # the guarded model_type of saved config.json files (see hf_guard)
