"""lm-evaluation-harness on an abqc model: ``abqc lm-eval DIR --tasks ...``.

The quantized transformers tree goes into lm-eval's ``HFLM`` as it is (the Python path,
``HFLM(pretrained=cm.hf_model, tokenizer=tok)``, is the same): no re-export, the packed
linears run on the kernels. Local tasks come from ``include_path`` (a directory of task
YAML files); stock tasks download their data from the Hub.
"""
from __future__ import annotations

from typing import Any, Sequence

from .errors import AbqcError, ConfigError


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AbqcError("lm-eval is not installed; pip install lm-eval (or abqc[test])") from None
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return simple_evaluate, HFLM, TaskManager


def transformers_model(model):
    """The transformers model lm-eval runs: a CompiledModel's tree, or the model itself."""
    from .compiled import CompiledModel

    if isinstance(model, CompiledModel):
        if model.hf_model is None:
            raise ConfigError("lm-eval runs the transformers model tree; backend='fake_quant' "
                              "has none (compile with backend='kernels')")
        model._check_tree_is_whole("lm-eval")
        return model.hf_model
    return model


def evaluate(model, tokenizer, tasks: Sequence[str], include_path: str | None = None,
             num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 1,
             max_length: int | None = None, log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of `model` (a CompiledModel or a transformers model) on
    `tasks`; an unknown task is refused naming it and where tasks were looked for."""
    simple_evaluate, HFLM, TaskManager = _lm_eval()
    if not tasks:
        raise ConfigError("no tasks given; pass --tasks NAME[,NAME...]")
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(tm.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        where = f"the stock tasks and {include_path}" if include_path else \
            "the stock tasks (pass --include-path DIR for local task YAML files)"
        raise ConfigError(f"unknown lm-eval task(s) {missing}; looked in {where}")
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    lm = HFLM(pretrained=transformers_model(model), tokenizer=tokenizer, **kwargs)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, num_fewshot=num_fewshot,
                           limit=limit, log_samples=log_samples)


def table(out: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    return make_table(out)


def result_json(out: dict[str, Any], model, spec: str | None = None) -> dict[str, Any]:
    """What ``abqc lm-eval --json`` writes: lm-eval's results, the abqc version and config."""
    from .eval import _config_of
    from .version import __version__

    return {"model": spec, "abqc_version": __version__, "config": _config_of(model),
            "results": out.get("results", {}), "n-shot": out.get("n-shot", {}),
            "versions": out.get("versions", {})}
