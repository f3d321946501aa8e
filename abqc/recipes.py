"""Recipes and the command line generated from `CompileConfig`.

One place for every compile option: the fields of `abqc.config.CompileConfig` give the
names, types and defaults, `FIELD_HELP` here their help. `add_config_args` turns every
field into a flag of ``abqc compile`` / ``abqc eval`` / ``abqc generate``:

- ``bool`` -> ``--smooth`` / ``--no-smooth``;
- ``int``, ``float``, ``str`` (and ``| None``: the word ``none``) -> one value;
- ``wbits`` (``int | str``) -> ``4`` or ``2*``;
- tuples -> comma lists (``--exclude lm_head,embed``; repeatable; a JSON list also works);
- mappings (``overrides``, ``solver_options``, ``abq_options``) -> JSON objects.

A field whose type has no rule here makes `add_config_args` raise, so a new field is
never silently missing from the command line (``tests/test_recipes.py`` builds the parser
and sets every field).

A recipe is a YAML or JSON file of the same fields (plus optionally ``model``, the source
model spec, and ``scheme``); `scheme` presets are ``W<bits>A<bits>[g<group>]`` strings.
Precedence: the config's defaults < the recipe < ``--scheme`` < explicit flags. Every saved
model carries ``recipe.json`` (`recipe_dict`), which ``abqc compile --recipe`` reproduces.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from .config import (ACT_BITS, BACKENDS, BIT_BALANCE, FLOAT_BITS, METHODS, OVERRIDE_KEYS,
                     WEIGHT_BITS, CompileConfig)
from .errors import ConfigError

#: Help of each CompileConfig field (the one place; a field missing here falls back to the
#: comment on its line in config.py, then to its name).
FIELD_HELP: dict[str, str] = {
    "wbits": f"weight bits: 1..8, or '{BIT_BALANCE}' (bit balance: 5 symmetric levels stored as 3 bits)",
    "abits": "activation bits: 1..8, or 16 = float activations (weight-only)",
    "group_size": "weight group size along K; 0 = one scale per output channel "
                  "(the kernels take multiples of 64)",
    "symmetric": "symmetric weight grid",
    "act_symmetric": "symmetric activation grid",
    "method": "calibration method: " + " | ".join(METHODS),
    "overrides": "per-module settings by regex, as JSON, e.g. '{\"down_proj\": {\"wbits\": 8}}'; "
                 "keys: " + ", ".join(OVERRIDE_KEYS) + " (also --override PATTERN:K=V,...)",
    "exclude": "regexes of modules kept in float, comma-separated (repeatable)",
    "lm_head_bits": "weight bits of the output projection (lm_head), per channel; 16 keeps it in float",
    "nsamples": "calibration windows (data-driven methods)",
    "seqlen": "calibration window length in tokens",
    "seed": "seed of the calibration window sampling",
    "calib_corpus": "calibration corpus: 'pydoc' (the CPython docs) or a text file",
    "solver_options": "layer-wise solver options as JSON, e.g. '{\"sweeps\": 10, \"act_order\": true}' "
                      "(also --solver KEY=VALUE)",
    "calib_device": "where the layer-wise solvers run: cpu, cuda or cuda:N",
    "backend": "kernels: quantized linears on the generated kernels; fake_quant: the float "
               "reference graph (" + " | ".join(BACKENDS) + ")",
    "tune": "tune kernel keys the tuning log does not know now (none: only with ABQC_TUNE=1)",
    "smooth": "SmoothQuant scales folded into the preceding norm / linear (always on for abq)",
    "smooth_alpha": "SmoothQuant migration strength in [0, 1]",
    "abq_options": "ABQ options as JSON, e.g. '{\"epochs\": 2, \"compensation\": false}'",
    "kv_bits": "bits of Q, K, V in attention (16 = float; fake-quant only)",
    "bit_budget": "mixed precision: average weight bits to assign per linear (none = off)",
    "bit_widths": "mixed precision: the widths to choose from, comma-separated, e.g. '2*,3,4,6,8'",
    "bit_sensitivity": "mixed precision sensitivity: fisher | loss | output",
    "max_seq_len": "longest sequence the captured graph takes (none = the model's)",
    "dump_ir": "write the IR after each pass to this directory",
    "print_ir": "print the IR after each pass",
    "strict": "make what would only be a warning (a quantized linear left in float, an override "
              "or exclude pattern matching no module) an error",
}

#: Flag names that differ from the field name (``eval`` has its own --seqlen, the window).
FLAG_NAMES = {"seqlen": "calib-seqlen", "calib_corpus": "calib-corpus"}
#: Extra spellings kept from earlier versions of the command line.
FLAG_ALIASES = {"calib_corpus": ("--calib",)}
#: Keys a recipe file may hold besides the CompileConfig fields.
RECIPE_EXTRA_KEYS = ("model", "scheme", "abqc_version")
#: Fields a saved recipe leaves out (reporting, not the model).
NOT_IN_RECIPE = ("dump_ir", "print_ir")
#: Presets shown in --help; `parse_scheme` takes any W<w>A<a>[g<group>].
SCHEMES = ("W4A16", "W4A16g128", "W8A16", "W8A8", "W6A6", "W4A8", "W4A4", "W3A16g128",
           f"W{BIT_BALANCE}A8", f"W{BIT_BALANCE}A16")
DEST_PREFIX = "config:"


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(CompileConfig))


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(CompileConfig)


def _source_comments() -> dict[str, str]:
    """name -> the comment on the line that declares the field in config.py."""
    try:
        src = inspect.getsource(CompileConfig)
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.+))?$", line)
        c = re.match(r"\s+#\s*(.+)$", line)
        if c:
            above.append(c.group(1).strip())
            continue
        if m and (m.group(2) or above):
            out[m.group(1)] = m.group(2).strip() if m.group(2) else " ".join(above)
        above = []
    return out


def field_help(name: str) -> str:
    return FIELD_HELP.get(name) or _source_comments().get(name) or f"CompileConfig.{name}"


def flag_for(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name.replace("_", "-"))


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


# -- value parsers: one per kind of type --------------------------------------------------

def _none_or(parse):
    def inner(text: str):
        return None if text.strip().lower() in ("none", "null") else parse(text)
    inner.__name__ = parse.__name__
    return inner


def parse_bits(text: str) -> int | str:
    """'4' -> 4, '2*' -> '2*'."""
    text = text.strip()
    if text == BIT_BALANCE:
        return BIT_BALANCE
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a bit width; use 1..8 or {BIT_BALANCE!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object ({e.msg}); e.g. '{{\"epochs\": 2}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; e.g. '{{\"epochs\": 2}}'")
    return value


def _list_item(text: str) -> Any:
    text = text.strip()
    if text == BIT_BALANCE:
        return text
    try:
        return int(text)
    except ValueError:
        return text


def comma_list(item=str):
    """'a,b' -> ['a', 'b']; a JSON list ('["a", 2]') is taken as is."""
    def parse(text: str) -> list:
        if text.strip().startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list ({e.msg})") from None
            if not isinstance(value, list):
                raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list")
            return value
        return [item(v.strip()) for v in text.split(",") if v.strip()]
    parse.__name__ = "list"
    return parse


def _kind(tp: Any) -> tuple[str, bool]:
    """(kind, optional) of a field type: kind in bool, int, float, str, bits, list, intlist, mapping."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        rest = tuple(a for a in args if a is not type(None))
        optional = len(rest) < len(args)
        if set(rest) == {int, str}:
            return "bits", optional
        if len(rest) != 1:
            return f"unsupported {tp!r}", optional
        tp = rest[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (bool, int, float, str):
        return tp.__name__, optional
    if tp is tuple or origin is tuple:
        return ("list" if args and args[0] is str else "intlist"), optional
    import collections.abc as cabc
    if tp in (dict, Mapping) or origin in (dict, cabc.Mapping, typing.Mapping):
        return "mapping", optional
    return f"unsupported {tp!r}", optional


def field_kinds() -> dict[str, tuple[str, bool]]:
    hints = field_types()
    return {f.name: _kind(hints[f.name]) for f in config_fields()}


def add_config_args(parser: argparse.ArgumentParser, title: str = "quantization (CompileConfig)"):
    """One flag per CompileConfig field (dest ``config:<name>``, absent unless given), plus
    --scheme, --recipe and the repeatable --override / --solver shorthands."""
    g = parser.add_argument_group(title)
    g.add_argument("--scheme", default=None, metavar="WxAy",
                   help="preset bit widths: W<1..8 or 2*>A<1..8 or 16>[g<group>], e.g. "
                        + ", ".join(SCHEMES) + " (explicit flags override it)")
    g.add_argument("--recipe", default=None, metavar="FILE",
                   help="YAML or JSON file of these options (and optionally 'model'); flags "
                        "override it; every saved model has one, recipe.json")
    kinds = field_kinds()
    for f in config_fields():
        kind, optional = kinds[f.name]
        default = field_default(f)
        shown = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else \
            json.dumps(default) if isinstance(default, dict) else default
        help_ = f"{field_help(f.name)} (default: {shown})".replace("%", "%%")
        names = (flag_for(f.name),) + FLAG_ALIASES.get(f.name, ())
        common = dict(dest=DEST_PREFIX + f.name, default=argparse.SUPPRESS, help=help_)
        if kind == "bool":
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
            continue
        if kind in ("list", "intlist"):
            item = str if kind == "list" else _list_item
            g.add_argument(*names, action="extend", type=comma_list(item), metavar="A,B,...", **common)
            continue
        parse = {"int": _int, "float": _float, "str": str, "bits": parse_bits,
                 "mapping": parse_json_object}.get(kind)
        if parse is None:
            raise TypeError(f"CompileConfig.{f.name} has type {field_types()[f.name]!r}, which "
                            "abqc.recipes.add_config_args has no command-line rule for; add one")
        metavar = {"mapping": "JSON", "bits": "BITS"}.get(kind, f.name.upper())
        g.add_argument(*names, type=_none_or(parse) if optional else parse, metavar=metavar, **common)
    g.add_argument("--override", action="append", type=parse_override, default=[],
                   metavar="PATTERN:K=V,...", dest="config_override",
                   help="per-module settings by regex, e.g. 'down_proj:wbits=8' (repeatable; "
                        "merged into --overrides)")
    g.add_argument("--solver", action="append", type=parse_solver_option, default=[],
                   metavar="KEY=VALUE", dest="config_solver",
                   help="one solver option, e.g. sweeps=10 (repeatable; merged into --solver-options)")
    return g


# -- the legacy KEY=VALUE shorthands -------------------------------------------------------

def scalar(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    return v


def parse_override(text: str) -> tuple[str, dict[str, Any]]:
    """``"down_proj:wbits=8,abits=16"`` -> ("down_proj", {"wbits": 8, "abits": 16})."""
    pattern, sep, fields = text.rpartition(":")
    if not sep or not pattern or not fields:
        raise argparse.ArgumentTypeError(
            f"--override {text!r} is not PATTERN:key=value[,key=value...], e.g. 'down_proj:wbits=8'")
    out = {}
    for item in fields.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--override {text!r}: {item!r} is not key=value")
        v = value.strip()
        out[key.strip()] = v if v == BIT_BALANCE else scalar(v)
    return pattern, out


def parse_solver_option(text: str) -> tuple[str, Any]:
    """``"sweeps=10"`` -> ("sweeps", 10)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"--solver {text!r} is not KEY=VALUE, e.g. 'sweeps=10'")
    return key.strip(), scalar(value.strip())


# -- schemes ---------------------------------------------------------------------------------

def parse_scheme(text: str) -> dict[str, Any]:
    """'W4A8' -> {wbits: 4, abits: 8}; 'W4A16g128' -> also group_size 128; 'W2*A8' -> wbits '2*'."""
    m = re.fullmatch(r"[Ww](2\*|\d+)[Aa](\d+)(?:[-_]?[Gg](\d+))?", str(text).strip())
    allowed = (f"use W<{WEIGHT_BITS[0]}..{WEIGHT_BITS[-1]} or {BIT_BALANCE}>A<1..8 or "
               f"{FLOAT_BITS}>[g<group size>], e.g. " + ", ".join(SCHEMES))
    if not m:
        raise ConfigError(f"scheme {text!r} is not understood; {allowed}")
    w = BIT_BALANCE if m.group(1) == BIT_BALANCE else int(m.group(1))
    a = int(m.group(2))
    if (w != BIT_BALANCE and w not in WEIGHT_BITS) or a not in ACT_BITS:
        raise ConfigError(f"scheme {text!r} is not allowed; {allowed}")
    out: dict[str, Any] = {"wbits": w, "abits": a}
    if m.group(3) is not None:
        out["group_size"] = int(m.group(3))
    return out


# -- recipe files ----------------------------------------------------------------------------

def _normalise(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check names against CompileConfig and turn JSON lists into the tuples it declares."""
    names = [f.name for f in config_fields()]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; allowed: {names}")
    kinds = field_kinds()
    out = {}
    for k, v in options.items():
        if kinds[k][0] in ("list", "intlist") and isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def load_recipe(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CompileConfig options, extras: model / scheme / abqc_version) from a YAML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {e.strerror or e}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"recipe {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}); "
                              "use .yaml / .yml for YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of CompileConfig options, "
                          f"got {type(data).__name__}")
    extras = {k: data.pop(k) for k in RECIPE_EXTRA_KEYS if k in data}
    return _normalise(data, f"recipe {str(path)!r}"), extras


def recipe_dict(config: CompileConfig, model: str | None = None) -> dict[str, Any]:
    """What ``recipe.json`` holds: the abqc version, the source model spec (when known) and
    every CompileConfig field but the reporting ones."""
    from .version import __version__

    d = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_RECIPE}
    return {"abqc_version": __version__, "model": model, **d}


def write_recipe(directory: str | os.PathLike, config: CompileConfig, model: str | None = None) -> Path:
    from .atomic import write_json

    return write_json(Path(directory) / "recipe.json", recipe_dict(config, model))


# -- from parsed arguments -------------------------------------------------------------------

def explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The CompileConfig options given as flags (not the recipe's, not the scheme's)."""
    opts = {k[len(DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX)}
    return _normalise(opts, "command line")


def wants_compile(args: argparse.Namespace) -> bool:
    """Whether any option, --scheme, --recipe, --override or --solver was given."""
    return bool(explicit_options(args) or args.scheme or args.recipe
                or getattr(args, "config_override", None) or getattr(args, "config_solver", None))


def options_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CompileConfig options, recipe extras): defaults < recipe < --scheme < flags; the
    --override / --solver shorthands are merged into overrides / solver_options."""
    options: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    if args.recipe:
        options, extras = load_recipe(args.recipe)
    scheme = args.scheme or extras.get("scheme")
    if args.scheme is None and extras.get("scheme"):
        options = {**parse_scheme(extras["scheme"]), **options}  # the recipe's own fields win
    elif scheme:
        options.update(parse_scheme(scheme))
    options.update(explicit_options(args))
    if getattr(args, "config_override", None):
        options["overrides"] = {**dict(options.get("overrides") or {}), **dict(args.config_override)}
    if getattr(args, "config_solver", None):
        options["solver_options"] = {**dict(options.get("solver_options") or {}),
                                     **dict(args.config_solver)}
    return options, extras


def config_from_args(args: argparse.Namespace) -> CompileConfig:
    return CompileConfig.from_options(**options_from_args(args)[0])
