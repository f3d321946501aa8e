"""QuantFormat: everything a packed linear's kernel needs to know, as one short string.

The string travels inside the graph (the ``spec`` argument of ``abqc::qlinear``) and in
the saved config, so a node, a module and a checkpoint all name their kernel the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..codegen.compute import KernelShape, formulations_for
from ..errors import ConfigError

_FIELDS = {"n": "n", "k": "k", "w": "wbits", "a": "abits", "g": "group_size",
           "sym": "act_symmetric", "f": "formulation"}


@dataclass(frozen=True)
class QuantFormat:
    """A packed linear: N x K weights at `wbits` (packed for `formulation`), `abits`
    activations (16: float), weight groups of `group_size` (0: per channel)."""

    n: int
    k: int
    wbits: int
    abits: int
    group_size: int = 0
    act_symmetric: bool = False
    formulation: str = "unpack"

    def __post_init__(self):
        allowed = formulations_for(self.abits)
        if self.formulation not in allowed:
            raise ConfigError(f"formulation={self.formulation!r} does not fit abits={self.abits}; "
                              f"use one of {list(allowed)}")
        if self.formulation == "vnni" and self.group_size:
            raise ConfigError(f"formulation='vnni' takes per-channel weights, not group_size="
                              f"{self.group_size}; use 'unpack' or 'bitserial' for groups")

    @property
    def shape(self) -> KernelShape:
        return KernelShape(self.n, self.k, self.wbits, self.abits, self.group_size)

    @property
    def weight_only(self) -> bool:
        return self.abits == 16

    def __str__(self) -> str:
        inv = {v: k for k, v in _FIELDS.items()}
        return ",".join(f"{inv[f.name]}={int(v) if isinstance(v, bool) else v}"
                        for f in fields(self) for v in [getattr(self, f.name)])

    @classmethod
    def parse(cls, text: str) -> "QuantFormat":
        try:
            kv = dict(item.split("=", 1) for item in text.split(","))
            args = {_FIELDS[k]: v for k, v in kv.items()}
            for name in ("n", "k", "wbits", "abits", "group_size"):
                args[name] = int(args[name])
            args["act_symmetric"] = args.get("act_symmetric", "0") in ("1", "True")
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{text!r} is not a packed-linear format "
                              f"(expected e.g. 'n=576,k=576,w=4,a=8,g=0,sym=0,f=bitserial'): {e}") from None
        return cls(**args)
