"""Errors abqc raises for bad input; each message names the bad value and what is allowed."""
from __future__ import annotations


class AbqcError(Exception):
    """Base class of abqc's own errors."""


class ConfigError(AbqcError, ValueError):
    """An argument or option has a value abqc does not accept."""


class UnsupportedModelError(AbqcError, ValueError):
    """The model cannot be compiled (unknown architecture, no linear layers, ...)."""
