"""Typed configuration: what `abqc.compile` accepts, validated once, up front.

`QuantSpec` describes one tensor's quantization (bits, grid, granularity);
`LinearAnnotation` is what a linear node carries in ``node.meta["abqc"]``;
`CompileConfig` is the whole set of options, with per-module overrides by regex.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

#: Activation width meaning "not quantized" (float activations: weight-only WxA16).
FLOAT_BITS = 16
WEIGHT_BITS = tuple(range(1, 9))
ACT_BITS = tuple(range(1, 9)) + (FLOAT_BITS,)
GRANULARITIES = ("channel", "group", "token")
#: wbits value of the "bit balance" format: the 5-level symmetric grid (codes 0..4),
#: stored and run as 3 bits.
BIT_BALANCE = "2*"
BIT_BALANCE_QMAX = 4


def sym_zero(qmax: int) -> float:
    """Zero point of the symmetric grid with codes 0..qmax.

    Odd qmax (2^b - 1, b >= 2): the GPTQ convention, zero = 2^(b-1), so zero is a level.
    Even qmax (the 5-level "bit balance" grid, qmax = 4): zero = qmax / 2, exactly symmetric.
    qmax = 1: zero = 0.5, the binary grid {-a, +a}.
    """
    if qmax == 1 or qmax % 2 == 0:
        return qmax / 2
    return (qmax + 1) / 2


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: x_hat = scale * (q - zero), q integer in [0, qmax]."""

    bits: int
    symmetric: bool = False
    granularity: str = "channel"  # weights: channel | group; activations: token
    group_size: int = 0  # > 0 only for granularity "group"
    dynamic: bool = False  # qparams computed at run time (activations)
    balanced: bool = False  # the "2*" grid: 5 symmetric levels, stored as 3 bits

    def __post_init__(self):
        if self.balanced and (self.bits != 3 or not self.symmetric):
            raise ConfigError(f"a bit-balance (2*) spec is stored as 3 symmetric bits; got "
                              f"bits={self.bits!r}, symmetric={self.symmetric!r}")
        if self.bits not in WEIGHT_BITS:
            raise ConfigError(f"bits={self.bits!r} is not allowed; use an integer in 1..8")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity={self.granularity!r} is not allowed; use one of {GRANULARITIES}")
        if (self.granularity == "group") != (self.group_size > 0):
            raise ConfigError(
                f"group_size={self.group_size!r} does not fit granularity={self.granularity!r}: "
                "a positive group size goes with 'group', 0 with the others")

    @property
    def qmax(self) -> int:
        return BIT_BALANCE_QMAX if self.balanced else (1 << self.bits) - 1

    def describe(self) -> str:
        gran = f"g{self.group_size}" if self.granularity == "group" else f"per-{self.granularity}"
        kind = "sym" if self.symmetric else "asym"
        dyn = " dynamic" if self.dynamic else ""
        bits = f"{BIT_BALANCE}(5 levels, stored 3)b" if self.balanced else f"{self.bits}b"
        return f"{bits} {gran} {kind}{dyn}"


@dataclass(frozen=True)
class LinearAnnotation:
    """The quantization decision for one linear layer (``node.meta["abqc"]``)."""

    path: str
    weight: QuantSpec | None
    act: QuantSpec | None
    method: str = "rtn"

    def describe(self) -> str:
        w = f"W{self.weight.describe()}" if self.weight else "W float"
        a = f"A{self.act.describe()}" if self.act else "A float"
        return f"{w} | {a} | {self.method}"


BACKENDS = ("kernels", "fake_quant")
#: Weight groups the packed kernels take are whole 64-bit words of K (codegen.packing.WORD).
KERNEL_GROUP_ALIGN = 64
#: Block-wise methods (trained per decoder block, not per linear): no layer-wise solver.
BLOCK_METHODS = ("abq",)
METHODS = ("rtn", "gptq", "quantease", "quantease_outlier", "gptq_quantease") + BLOCK_METHODS

#: Fields an override may set for the modules its regex matches.
OVERRIDE_KEYS = ("wbits", "abits", "group_size", "symmetric", "act_symmetric", "method", "skip")


def _check_bits(name: str, value: Any, allowed: tuple[int, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; use one of {list(allowed)}"
                          + (" (16 = float activations)" if FLOAT_BITS in allowed else ""))


def _check_wbits(name: str, value: Any) -> None:
    if value == BIT_BALANCE:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in WEIGHT_BITS:
        raise ConfigError(f"{name}={value!r} is not allowed; use one of {list(WEIGHT_BITS)} "
                          f"or {BIT_BALANCE!r} (bit balance: 5 symmetric levels stored as 3 bits)")


def weight_spec(wbits: Any, symmetric: bool, group_size: int) -> QuantSpec:
    """The weight QuantSpec for a (validated) wbits value; "2*" is the 5-level symmetric grid."""
    gran = "group" if group_size else "channel"
    if wbits == BIT_BALANCE:
        return QuantSpec(bits=3, symmetric=True, granularity=gran, group_size=group_size,
                         balanced=True)
    return QuantSpec(bits=wbits, symmetric=symmetric, granularity=gran, group_size=group_size)


def _check_group(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"group_size={value!r} is not allowed; use 0 (per channel) "
                          "or a positive integer such as 64 or 128")


def _check_device(value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ConfigError(f"calib_device={value!r} is not allowed; use 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class CompileConfig:
    """Every option of `abqc.compile`. Unknown names and bad values raise `ConfigError`."""

    wbits: int | str = 4  # 1..8, or "2*" (bit balance)
    abits: int = 16
    group_size: int = 0
    symmetric: bool = False  # weights
    act_symmetric: bool = False
    method: str = "rtn"
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    # the output projection (lm_head, tied or not): 8 puts it on the kernels (per-channel
    # weights, activations at max(abits, 8)); 16 keeps it float. Float by default: measured on
    # SmolLM2 W4A8 (bench/results/lm_head.json) the 8-bit head cost +0.8% perplexity and +17%
    # saved size for no clear decode gain while Python dominates the step
    lm_head_bits: int = 16
    # calibration data (used by data-driven methods; RTN ignores it)
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib_corpus: str = "pydoc"
    solver_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"sweeps": 30}
    # where the layer-wise calibration runs: one decoder block at a time is moved there
    calib_device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    # lowering: "kernels" runs quantized linears on the generated integer kernels;
    # "fake_quant" keeps the float graph with quantize/dequantize ops (the reference)
    backend: str = "kernels"
    tune: bool | None = None  # tune unknown kernel keys now (None: unless ABQC_TUNE=0)
    # SmoothQuant scales folded in before quantization (always on for method "abq")
    smooth: bool = False
    smooth_alpha: float = 0.5
    # QuaRot's offline rotation of the residual stream ("hadamard"), before any other pass
    rotate: str | None = None
    abq_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"epochs": 2}
    # attention activations: Q, K (per token and head, after RoPE) and V (per token)
    kv_bits: int = FLOAT_BITS
    # mixed precision: per-linear weight widths chosen under this average (BitWidthAssignment)
    bit_budget: float | None = None
    bit_widths: tuple = (BIT_BALANCE, 3, 4, 6, 8)
    bit_sensitivity: str = "fisher"  # or "loss", "output" (see passes/bitwidth.py)
    # capture
    max_seq_len: int | None = None
    # reporting
    dump_ir: str | None = None
    print_ir: bool = False
    # strict=True: what would only be a warning (a quantized linear left in float, an
    # override or exclude pattern that matches no module) is an error instead
    strict: bool = False

    def __post_init__(self):
        for name in ("symmetric", "act_symmetric", "smooth", "print_ir", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed; use True or False")
        if self.tune is not None and not isinstance(self.tune, bool):
            raise ConfigError(f"tune={self.tune!r} is not allowed; use True, False or None "
                              "(None: tune only with ABQC_TUNE=1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} is not allowed; use an integer")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or not isinstance(
                self.max_seq_len, int) or self.max_seq_len < 1):
            raise ConfigError(f"max_seq_len={self.max_seq_len!r} is not allowed; use None (the "
                              "model's max_position_embeddings) or a positive integer")
        if self.dump_ir is not None and not isinstance(self.dump_ir, (str, os.PathLike)):
            raise ConfigError(f"dump_ir={self.dump_ir!r} is not allowed; use None or a directory path")
        if not isinstance(self.calib_corpus, str) or not self.calib_corpus:
            raise ConfigError(f"calib_corpus={self.calib_corpus!r} is not allowed; use a corpus "
                              "name such as 'pydoc' or 'wikitext2', or a text file path")
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"overrides={self.overrides!r} is not allowed; use a dict of "
                              "module regex -> settings, e.g. {'down_proj': {'wbits': 8}}")
        if not isinstance(self.exclude, (str, list, tuple)):
            raise ConfigError(f"exclude={self.exclude!r} is not allowed; use a list of module regexes")
        for pat in ([self.exclude] if isinstance(self.exclude, str) else list(self.exclude)) + list(self.overrides):
            if not isinstance(pat, str):
                raise ConfigError(f"module pattern {pat!r} is not allowed; use a regex string "
                                  "such as 'down_proj' or r'layers\\.0\\.'")
        _check_wbits("wbits", self.wbits)
        _check_bits("abits", self.abits, ACT_BITS)
        _check_bits("kv_bits", self.kv_bits, ACT_BITS)
        _check_bits("lm_head_bits", self.lm_head_bits, WEIGHT_BITS + (FLOAT_BITS,))
        if self.rotate not in (None, "hadamard"):
            raise ConfigError(f"rotate={self.rotate!r} is not allowed; use 'hadamard' or None")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                or not 0 <= self.smooth_alpha <= 1:
            raise ConfigError(f"smooth_alpha={self.smooth_alpha!r} is not allowed; use a number in [0, 1]")
        if self.bit_budget is not None and (isinstance(self.bit_budget, bool) or not isinstance(
                self.bit_budget, (int, float)) or not 1 <= self.bit_budget <= 8):
            raise ConfigError(f"bit_budget={self.bit_budget!r} is not allowed; use an average "
                              "number of weight bits in [1, 8], e.g. 3.0")
        object.__setattr__(self, "bit_widths", tuple(self.bit_widths))
        if not self.bit_widths:
            raise ConfigError("bit_widths=() is not allowed; give the widths to choose from, e.g. ('2*', 3, 4)")
        for w in self.bit_widths:
            _check_wbits("bit_widths entry", w)
        if self.bit_sensitivity not in ("fisher", "loss", "output"):
            raise ConfigError(f"bit_sensitivity={self.bit_sensitivity!r} is not allowed; use 'fisher' "
                              "(loss-weighted, default), 'loss' (measured per linear and width) or "
                              "'output' (layer output error)")
        from .calibration.abq_options import ABQOptions
        ABQOptions.from_dict(dict(self.abq_options))  # refuse bad ABQ options up front
        _check_group(self.group_size)
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not allowed; use one of {list(METHODS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not allowed; use one of {list(BACKENDS)}")
        for name in ("nsamples", "seqlen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is not allowed; use a positive integer")
        _check_device(self.calib_device)
        if self.calib_device != "cpu" and self.method == "abq":
            raise ConfigError(f"calib_device={self.calib_device!r} applies to the layer-wise "
                              "solvers; method='abq' calibrates on the CPU (use calib_device='cpu')")
        from .solvers.options import SolverOptions
        SolverOptions.from_dict(dict(self.solver_options))  # refuse bad solver options up front
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        for pat in list(self.exclude) + list(self.overrides):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"module pattern {pat!r} is not a valid regex: {e}") from None
        for pat, ov in self.overrides.items():
            if not isinstance(ov, Mapping):
                raise ConfigError(f"override for {pat!r} must be a dict of {list(OVERRIDE_KEYS)}, "
                                  f"got {ov!r}")
            bad = sorted(set(ov) - set(OVERRIDE_KEYS))
            if bad:
                raise ConfigError(f"override for {pat!r} has unknown keys {bad}; "
                                  f"allowed: {list(OVERRIDE_KEYS)}")
            if "wbits" in ov:
                _check_wbits(f"overrides[{pat!r}].wbits", ov["wbits"])
            if "abits" in ov:
                _check_bits(f"overrides[{pat!r}].abits", ov["abits"], ACT_BITS)
            if "group_size" in ov:
                _check_group(ov["group_size"])
            if "method" in ov and ov["method"] not in METHODS:
                raise ConfigError(f"overrides[{pat!r}].method={ov['method']!r} is not allowed; "
                                  f"use one of {list(METHODS)}")
        if self.backend == "kernels":  # refused now, not after a long calibration
            for name, g in [("group_size", self.group_size)] + [
                    (f"overrides[{p!r}].group_size", ov["group_size"])
                    for p, ov in self.overrides.items() if "group_size" in ov]:
                if g % KERNEL_GROUP_ALIGN:
                    raise ConfigError(
                        f"{name}={g} does not fit the integer kernels, which take groups in "
                        f"multiples of {KERNEL_GROUP_ALIGN} (e.g. 64, 128) or 0 (per channel); "
                        "use such a size, or backend='fake_quant' to simulate this one")
        if "abq" in self.methods() and self.methods() != {"abq"}:
            raise ConfigError(f"method 'abq' calibrates whole blocks and cannot be mixed with "
                              f"other methods; got {sorted(self.methods())}")

    @classmethod
    def from_options(cls, **options: Any) -> "CompileConfig":
        """Build from keyword options, naming any unknown option and listing the allowed ones."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; allowed options: {allowed}")
        return cls(**options)

    def methods(self) -> set[str]:
        """Every calibration method this config uses (global and in overrides)."""
        return {self.method} | {ov["method"] for ov in self.overrides.values() if "method" in ov}

    def annotation_for(self, path: str, output: bool = False) -> LinearAnnotation | None:
        """The quantization of the linear at module `path`, or None to leave it in float.

        ``output``: `path` is the model's output projection, which gets `lm_head_bits`
        per-channel weights (RTN; it is outside the decoder blocks that calibration solves)
        and activations at max(abits, 8) unless an override names it."""
        if any(re.search(p, path) for p in self.exclude):
            return None
        s = dict(wbits=self.wbits, abits=self.abits, group_size=self.group_size,
                 symmetric=self.symmetric, act_symmetric=self.act_symmetric,
                 method=self.method, skip=False)
        if output:
            if self.lm_head_bits == FLOAT_BITS:
                s["skip"] = True
            s.update(wbits=self.lm_head_bits, group_size=0, symmetric=False, method="rtn",
                     abits=FLOAT_BITS if self.abits == FLOAT_BITS else max(self.abits, 8))
        for pat, ov in self.overrides.items():
            if re.search(pat, path):
                s.update(ov)
        if s["skip"]:
            return None
        weight = weight_spec(s["wbits"], s["symmetric"], s["group_size"])
        act = None
        if s["abits"] != FLOAT_BITS:
            act = QuantSpec(bits=s["abits"], symmetric=s["act_symmetric"],
                            granularity="token", dynamic=True)
        return LinearAnnotation(path=path, weight=weight, act=act, method=s["method"])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        d["exclude"] = list(self.exclude)
        d["solver_options"] = dict(self.solver_options)
        d["abq_options"] = dict(self.abq_options)
        d["bit_widths"] = list(self.bit_widths)
        return d
