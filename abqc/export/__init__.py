"""Exports: an abqc model written in the format another engine runs.

Each format is one module here that registers an exporter with `register`; ``abqc export
--format NAME`` and `export` look it up by name. An exporter takes the compiled model (a
`CompiledModel`, or what `abqc.load` returns) and an output path, and returns the path it
wrote. Where a format needs weights solved onto its own grid (GGUF's block types), the
exporter takes the float source and the calibration options instead; it says so in its
docstring.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

#: format name -> the module that registers it (imported on first use: exports pull in
#: optional packages that a plain compile never needs)
FORMAT_MODULES = {
    "gguf": "abqc.export.gguf",
    "compressed-tensors": "abqc.export.compressed_tensors",
}

_EXPORTERS: dict[str, Callable[..., Path]] = {}


def register(name: str):
    """Decorator: ``@register("gguf")`` makes a function the exporter of that format."""
    def deco(fn: Callable[..., Path]) -> Callable[..., Path]:
        _EXPORTERS[name] = fn
        return fn
    return deco


def exporter(name: str) -> Callable[..., Path]:
    """The exporter of format `name`; an unknown name is a `ConfigError` listing the known ones."""
    if name not in FORMAT_MODULES:
        raise ConfigError(f"unknown export format {name!r}; known: {', '.join(sorted(FORMAT_MODULES))}")
    if name not in _EXPORTERS:
        importlib.import_module(FORMAT_MODULES[name])
    if name not in _EXPORTERS:
        raise ConfigError(f"export format {name!r} is declared but {FORMAT_MODULES[name]} "
                          "registered no exporter")
    return _EXPORTERS[name]


def export(model: Any, out: str | Path, format: str, **options: Any) -> Path:
    """Write `model` to `out` in `format` (see `FORMAT_MODULES`); returns the written path."""
    return exporter(format)(model, Path(out), **options)


__all__ = ["FORMAT_MODULES", "export", "exporter", "register"]
