"""transformers integration: ``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved
abqc model after ``import abqc``.

`AbqcConfig` is the ``quantization_config`` of the saved ``config.json``
(``quant_method: "abqc"``); `AbqcHfQuantizer` puts a `QuantLinear` of the recorded format
at every quantized linear's path before the packed tensors load into it, after
`verify_saved` has checked the directory: every file against the manifest
(`runtime.manifest`), the layer table's fields against each format, and the shapes and
dtypes in the safetensors headers against what each format packs to.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from typing import Any

from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ConfigError
from . import hf_guard
from .format import QuantFormat
from .manifest import MAX_JSON_BYTES, CorruptCheckpointError, verify_manifest  # noqa: F401
from .qlinear import QuantLinear

QUANT_METHOD = "abqc"


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(directory: str | os.PathLike, checksums: dict[str, str]) -> None:
    """(Before manifests.) Raise `CorruptCheckpointError` naming the first file that is
    missing or altered."""
    for name, digest in checksums.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CorruptCheckpointError(f"{path} is missing: the saved model is incomplete")
        got = sha256(path)
        if got != digest:
            raise CorruptCheckpointError(
                f"{path} does not match its checksum (sha256 {got[:12]}..., saved {digest[:12]}...): "
                "the file is truncated or was modified after abqc saved it; save the model again")


_ST_NAMES = {"int64": "I64", "int32": "I32", "uint8": "U8", "float32": "F32", "float16": "F16",
             "bfloat16": "BF16", "int8": "I8", "float64": "F64"}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
#: the format fields each packed tensor's shape depends on
_SHAPE_FIELDS = {"weight_packed": "n, k, w (wbits), f (formulation)",
                 "weight_scale": "n, g (group_size)", "weight_zero_point": "n, g (group_size)",
                 "weight_sum": "n, g (group_size)", "group_k": "k, g (group_size)", "bias": "n",
                 "outlier_indices": "outliers", "outlier_values": "outliers"}


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (name -> dtype, shape, offsets), read bounded."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_JSON_BYTES, size - 8):
            raise CorruptCheckpointError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path} has a damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a damaged safetensors header (not a table)")
    # the safetensors layout: tensors tile the data buffer exactly, each as big as its shape
    spans = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(v, dict) and v.get("dtype") in _ITEMSIZE and isinstance(v.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"]) \
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in v["data_offsets"])
        if ok:
            b, e = v["data_offsets"]
            numel = 1
            for d in v["shape"]:
                numel *= d
            ok = 0 <= b <= e and e - b == numel * _ITEMSIZE[v["dtype"]]
        if not ok:
            raise CorruptCheckpointError(f"{path}: safetensors entry {name!r} is damaged ({v!r:.200})")
        spans.append((b, e, name))
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            raise CorruptCheckpointError(f"{path}: safetensors entry {name!r} starts at {b}, not {end}")
        end = e
    if end != size - 8 - n:
        raise CorruptCheckpointError(f"{path}: the tensors take {end} bytes, the file holds "
                                     f"{size - 8 - n}: it is truncated or damaged")
    return header


def check_layers(layers: Any) -> dict[str, QuantFormat]:
    """The layer table's entries are well formed and agree with their own format string;
    returns path -> QuantFormat. Errors name the layer and the field."""
    if not isinstance(layers, dict):
        raise CorruptCheckpointError(f"quantization_config.layers is {type(layers).__name__}, "
                                     "not a table of path -> format")
    out = {}
    for path, spec in layers.items():
        where = f"quantization_config.layers[{path!r}]"
        if not isinstance(path, str) or not _PATH.fullmatch(path):
            raise CorruptCheckpointError(f"{where}: {path!r} is not a module path such as "
                                         "'model.layers.0.mlp.down_proj'")
        if not isinstance(spec, dict) or not isinstance(spec.get("format"), str):
            raise CorruptCheckpointError(f"{where} is {spec!r}, not a table with a 'format'")
        try:
            fmt = QuantFormat.parse(spec["format"])
        except ConfigError as e:
            raise CorruptCheckpointError(f"{where}.format: {e}") from None
        w = spec.get("weights") if isinstance(spec.get("weights"), dict) else {}
        for field, want in (("wbits", fmt.wbits), ("abits", fmt.abits),
                            ("group_size", fmt.group_size), ("act_symmetric", fmt.act_symmetric)):
            if field in spec and (spec[field] != want or type(spec[field]) is not type(want)):
                raise CorruptCheckpointError(
                    f"{where}.{field}={spec[field]!r} does not match its format {spec['format']!r} "
                    f"({field}={want!r}): config.json was edited; save the model again")
        for field, want in (("num_bits", fmt.wbits), ("group_size", fmt.group_size or None)):
            if field in w and w[field] != want:
                raise CorruptCheckpointError(
                    f"{where}.weights.{field}={w[field]!r} does not match its format "
                    f"{spec['format']!r} ({want!r}): config.json was edited; save the model again")
        if "symmetric" in w and not isinstance(w["symmetric"], bool):
            raise CorruptCheckpointError(f"{where}.weights.symmetric={w['symmetric']!r} is not a bool")
        if not isinstance(spec.get("bias", False), bool):
            raise CorruptCheckpointError(f"{where}.bias={spec['bias']!r} is not a bool")
        o = spec.get("outliers", 0)
        if isinstance(o, bool) or not isinstance(o, int) or o < 0:
            raise CorruptCheckpointError(f"{where}.outliers={o!r} is not a count >= 0")
        out[path] = fmt
    return out


def check_packed_tensors(directory: str | os.PathLike, layers: dict[str, dict]) -> None:
    """Each layer's stored tensors have the shapes and dtypes its format packs to (from the
    safetensors headers; no tensor data is read)."""
    import torch

    fmts = check_layers(layers)
    stored: dict[str, tuple[str, list]] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            for k, v in safetensors_header(os.path.join(directory, name)).items():
                if k != "__metadata__" and isinstance(v, dict):
                    stored[k] = (v.get("dtype"), v.get("shape"))
    for path, fmt in fmts.items():
        spec = layers[path]
        with torch.device("meta"):
            want = QuantLinear(fmt, bias=spec.get("bias", False), outliers=spec.get("outliers", 0))
        for buf, t in want._buffers.items():
            if t is None:
                continue
            key = f"{path}.{buf}"
            if key not in stored:
                raise CorruptCheckpointError(f"{key} is not in the saved weights, but "
                                             f"quantization_config.layers[{path!r}] needs it")
            dtype, shape = stored[key]
            exp = (_ST_NAMES.get(str(t.dtype).removeprefix("torch.")), list(t.shape))
            if (dtype, shape) != exp:
                raise CorruptCheckpointError(
                    f"{key} is stored as {dtype} {shape}, but quantization_config.layers"
                    f"[{path!r}].format {spec['format']!r} packs it as {exp[0]} {exp[1]} (it depends "
                    f"on the format's fields {_SHAPE_FIELDS.get(buf, buf)}): the format no longer "
                    "matches its packed tensors; save the model again")


def verify_saved(directory: str | os.PathLike, qc: dict[str, Any]) -> None:
    """Everything `abqc.load` and ``from_pretrained`` check before building a model: every file
    against the manifest, then the layer table against the packed tensors."""
    verify_manifest(directory)
    check_packed_tensors(directory, qc.get("layers", {}))


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
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            raise CorruptCheckpointError(f"quantization_config names {path!r}, which is not a "
                                         "module of this model") from None
        old = getattr(parent, name, None) if name in parent._modules else None
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
            verify_saved(os.path.dirname(checkpoint_files[0]), {"layers": cfg.layers})
        else:
            raise CorruptCheckpointError("an abqc model loads from a saved directory (no "
                                         "checkpoint files were given to verify)")
        replace_linears(model, check_layers(cfg.layers) and cfg.layers)

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
