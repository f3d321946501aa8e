"""A saved abqc directory never loads as a float model with random linears.

What transformers 5.x does with a saved abqc ``config.json`` when abqc is not imported:

* ``quantization_config.quant_method`` it does not know: `AutoHfQuantizer.supports_quant_method`
  logs a warning and loading goes on unquantized; the packed tensors (``weight_packed``, ...)
  are unexpected keys, every ``*.weight`` of a linear is a missing key, and missing keys are
  randomly initialised after a load report (a warning, not an error). Hence the bug.
* a ``model_type`` it does not know: `AutoConfig.from_pretrained` raises ``ValueError: The
  checkpoint you are trying to load has model type `<model_type>` but Transformers does not
  recognize this architecture`` -- the value is quoted in the message. Every ``Auto*``
  entry point (``AutoModelForCausalLM``, ``AutoModel``, ``pipeline``) goes through it.
* a concrete class (``LlamaForCausalLM.from_pretrained``) reads the file with
  ``LlamaConfig.from_pretrained``, which only warns about a foreign ``model_type`` and then,
  if a top-level dict value has ``model_type == "llama"``, takes that dict as the config.
  Configs are ``@strict`` dataclasses: a str where ``hidden_size: int`` is declared raises
  ``StrictDataclassFieldValidationError`` quoting the value.

So `guard_config` (called by `abqc.runtime.save.save` on the dict it writes) sets
``model_type`` to `GUARD_MODEL_TYPE`, whose text says ``import abqc``, and adds the entry
`GUARD_KEY`: ``{"model_type": <the real one>, "hidden_size": <a sentence saying how to
load>}``. That entry keeps the real model type (everything else stays at the top level, so
tokenizers and tools reading config.json see the usual fields) and is the trap for the
concrete classes. `register` (run by ``import abqc``) makes `GUARD_MODEL_TYPE` known to
`AutoConfig`; its config class's ``from_dict`` is `unguard_config` followed by the real
family's ``from_dict``, so ``AutoConfig``/``AutoModelForCausalLM.from_pretrained`` and
`abqc.load` get an ordinary ``LlamaConfig`` (...) back. Concrete classes fail with or
without abqc imported: they cannot be told to undo the guard, and an error is the only
alternative to random weights.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError

#: ``model_type`` written to a saved abqc config.json; AutoConfig quotes it when it fails.
GUARD_MODEL_TYPE = "abqc (run `import abqc` to load this model)"
#: Top-level config.json entry holding the real model type (and the concrete-class trap).
GUARD_KEY = "abqc_guard"
#: An int field every supported family's config declares; the trap puts `LOAD_HINT` there.
TRAP_FIELD = "hidden_size"
LOAD_HINT = ("this directory holds a model quantized by abqc (packed weights, not float ones): "
             "run `import abqc`, then load it with AutoModelForCausalLM.from_pretrained(dir) "
             "or abqc.load(dir)")


def is_guarded(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == GUARD_MODEL_TYPE


def guard_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config.json dict of a saved abqc model as written: a copy of `cfg` that plain
    transformers refuses with an error naming abqc. Idempotent."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"guard_config takes a config dict, got {type(cfg).__name__}")
    if is_guarded(cfg):
        unguard_config(cfg)  # checks the entry is intact
        return dict(cfg)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"config has model_type={model_type!r}: a saved model needs the "
                          "transformers model type (e.g. 'llama') to be guarded and reloaded")
    if GUARD_KEY in cfg:
        raise ConfigError(f"config already has a {GUARD_KEY!r} entry ({cfg[GUARD_KEY]!r}) but "
                          f"model_type={model_type!r}, not {GUARD_MODEL_TYPE!r}: it is damaged")
    out = dict(cfg)
    out["model_type"] = GUARD_MODEL_TYPE
    out[GUARD_KEY] = {"model_type": model_type, TRAP_FIELD: LOAD_HINT}
    return out


def unguard_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """What `guard_config` was given (a copy); a config that is not guarded comes back as is."""
    if not is_guarded(cfg):
        return dict(cfg)
    entry = cfg.get(GUARD_KEY)
    real = entry.get("model_type") if isinstance(entry, dict) else None
    if not isinstance(real, str) or not real or real == GUARD_MODEL_TYPE:
        raise ConfigError(f"config has model_type={GUARD_MODEL_TYPE!r} but its {GUARD_KEY!r} "
                          f"entry is {entry!r}, not {{'model_type': <the model's type>, ...}}: "
                          "config.json is damaged; save the model again")
    out = {k: v for k, v in cfg.items() if k != GUARD_KEY}
    out["model_type"] = real
    return out


def _guarded_config_class():
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    class AbqcGuardedConfig(PretrainedConfig):
        """What AutoConfig finds under `GUARD_MODEL_TYPE`; never instantiated: ``from_dict``
        returns the real family's config."""

        model_type = GUARD_MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            real = unguard_config(config_dict)
            if real["model_type"] not in CONFIG_MAPPING:
                raise ConfigError(f"the saved abqc model has model_type={real['model_type']!r}, "
                                  "which this transformers does not know")
            return CONFIG_MAPPING[real["model_type"]].from_dict(real, **kwargs)

    return AbqcGuardedConfig


def register() -> None:
    """Make `GUARD_MODEL_TYPE` known to AutoConfig (idempotent)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if GUARD_MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(GUARD_MODEL_TYPE, _guarded_config_class())
