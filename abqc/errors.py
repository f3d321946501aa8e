"""Errors abqc raises for bad input; each message names the bad value and what is allowed."""
from __future__ import annotations


class AbqcError(Exception):
    """Base class of abqc's own errors."""


class ConfigError(AbqcError, ValueError):
    """An argument or option has a value abqc does not accept."""


class UnsupportedModelError(AbqcError, ValueError):
    """The model cannot be compiled (unknown architecture, no linear layers, ...)."""


class AbqcWarning(UserWarning):
    """Something abqc did instead of what was asked (a fallback, a skipped record, a rebuilt
    cache entry, an option that matched nothing); ``strict=True`` makes compile-time ones errors."""


def warn_or_raise(message: str, strict: bool, stacklevel: int = 3) -> None:
    """A fallback or an option that did nothing: an `AbqcWarning`, or with ``strict=True``
    (`CompileConfig.strict`) a `ConfigError` with the same message."""
    if strict:
        raise ConfigError(message + " (strict=True makes this an error)")
    import warnings

    warnings.warn(message + " (strict=True makes this an error)", AbqcWarning, stacklevel=stacklevel)
