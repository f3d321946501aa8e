"""The one-line summary of a compile: bits per weight with scales, size, time per pass.

``cm.report()`` (or `report(cm)`) gives a `Report`; ``str(report)`` is the line that
``abqc.compile`` logs at the end and ``abqc compile`` prints. Sizes count what the format
stores: codes at their stored width (the 5-level "2*" grid in 3 bits), one float32 scale
and one float32 zero point per output channel and group, every other tensor (norms,
embeddings, float linears) in float32. Packing padding and the kernels' helper tensors
(``weight_sum``) are not counted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

#: Bits stored per (scale, zero point) pair of one output channel and group.
GRID_BITS = 2 * 32


@dataclass
class Report:
    linears: int                   # linears in the model
    quantized: int                 # of which quantized
    weights: int                   # weights of the quantized linears
    bits_per_weight: float         # codes + scales + zero points, per quantized weight
    code_bits: float               # codes alone, per quantized weight
    mb: float                      # the whole model as stored (MB = 1e6 bytes)
    float_mb: float                # the whole model in float32
    pass_seconds: list[tuple[str, float]] = field(default_factory=list)
    label: str = ""

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.pass_seconds)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass_seconds"] = [[n, round(s, 4)] for n, s in self.pass_seconds]
        d["seconds"] = round(self.seconds, 4)
        return d

    def __str__(self) -> str:
        ratio = self.float_mb / self.mb if self.mb else float("nan")
        passes = ", ".join(f"{n} {s:.2f}s" for n, s in self.pass_seconds)
        line = (f"{self.label + ': ' if self.label else ''}{self.quantized}/{self.linears} linears "
                f"quantized, {self.bits_per_weight:.3f} bits/weight with scales "
                f"({self.code_bits:.3f} code bits), {self.mb:.2f} MB "
                f"(float32 {self.float_mb:.2f} MB, {ratio:.1f}x smaller)")
        if self.pass_seconds:
            line += f"; passes {self.seconds:.2f}s: {passes}"
        return line


def _label(config) -> str:
    w = config.wbits
    a = "16" if config.abits == 16 else str(config.abits)
    g = f"g{config.group_size}" if config.group_size else ""
    return f"W{w}A{a}{g} {config.method}"


def _rows_from_program(cm):
    """([(N, K, annotation or None)] of every linear, float32 numel stored as float, float32
    numel of the whole float model), from the program's `Source` skeleton (meta tensors)."""
    from .facts import Source, facts

    gm = cm._modules.get("program")
    src = facts(gm).get(Source) if gm is not None else None
    if src is None:
        return None
    mods = dict(src.skeleton.named_modules())
    rows, quant_ids = [], set()
    for path, ann in cm.annotations.items():
        mod = mods.get(path)
        if not isinstance(mod, nn.Linear):
            continue
        rows.append((*mod.weight.shape, ann))
        if ann is not None:
            quant_ids.add(id(mod.weight))
    # a quantized lm_head tied to the embedding: the embedding stays float beside it
    shared = {id(p) for m in mods.values() if not isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)}
    params = list(_unique(src.skeleton.parameters()))  # (buffers such as RoPE's inv_freq: not weights)
    rest = sum(p.numel() for p in params if id(p) not in quant_ids or id(p) in shared)
    return rows, rest, sum(p.numel() for p in params)


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _rows_from_tree(cm):
    """The same from a loaded transformers tree (QuantLinear formats; float tensors)."""
    from .runtime.qlinear import QuantLinear

    tree = cm.hf_model
    rows, rest = [], 0
    for name, m in tree.named_modules():
        if isinstance(m, QuantLinear):
            f = m.fmt
            rows.append((f.n, f.k, (f.wbits, f.group_size)))
            if m.bias is not None:
                rest += m.bias.numel()
        elif isinstance(m, nn.Linear):
            rows.append((m.out_features, m.in_features, None))
    rest += sum(p.numel() for p in _unique(tree.parameters()))
    return rows, rest, rest + sum(n * k for n, k, a in rows if a is not None)


def _bits(ann) -> tuple[int, int] | None:
    """(stored code bits, group size) of an annotation or a (wbits, group) row."""
    if ann is None:
        return None
    if isinstance(ann, tuple):
        return ann
    return ann.weight.bits, ann.weight.group_size


def report(cm) -> Report:
    """The `Report` of a compiled or loaded model."""
    got = _rows_from_program(cm)
    rows, rest, float_numel = got if got is not None else _rows_from_tree(cm)
    weights = code = grid = quantized = 0
    for n, k, ann in rows:
        b = _bits(ann)
        if b is None:
            continue
        bits, g = b
        quantized += 1
        weights += n * k
        code += n * k * bits
        grid += n * (math.ceil(k / g) if g else 1) * GRID_BITS
    return Report(linears=len(rows), quantized=quantized, weights=weights,
                  bits_per_weight=(code + grid) / weights if weights else 0.0,
                  code_bits=code / weights if weights else 0.0,
                  mb=((code + grid) / 8 + 4 * rest) / 1e6, float_mb=4 * float_numel / 1e6,
                  pass_seconds=[(name, float(dt)) for _, name, dt in cm.pass_timings],
                  label=_label(cm.config))
