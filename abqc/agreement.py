"""Do all paths run the same program? Logit errors of graph, tree, saved + loaded, and
``from_pretrained``, each against the float model, for one compile.

The single-store rule says these are one number per compile; `path_errors` measures all
four so a test and `bench/one_store.py` can show it (the table of the "One program" issue).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .families import FAMILIES


def outlier_model(model: nn.Module, channels: int = 4, factor: float = 20.0) -> nn.Module:
    """`model` with the first `channels` of every attention-input norm scaled by `factor`
    (in place): the activation outliers that smoothing exists for."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(tuple(f"{f.input_norm}.weight" for f in FAMILIES.values())):
                p[:channels] *= factor
    return model


@torch.no_grad()
def path_errors(model: nn.Module, ids: torch.Tensor, workdir: str | Path | None = None,
                **compile_options: Any) -> dict[str, float]:
    """Relative logit error ||y - y_float|| / ||y_float|| of every path of one compile:
    ``graph`` (cm(ids)), ``tree`` (cm.hf_model, what generate runs), ``loaded`` (save +
    abqc.load) and ``from_pretrained`` (save + AutoModelForCausalLM)."""
    import abqc
    from transformers import AutoModelForCausalLM

    ref = model(ids).logits.float()
    cm = abqc.compile(model, **compile_options)
    rel = lambda y: float((y.float() - ref).norm() / ref.norm())  # noqa: E731
    out = {"graph": rel(cm(ids).logits), "tree": rel(cm.hf_model(ids).logits)}
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        cm.save(Path(d) / "m")
        out["loaded"] = rel(abqc.load(Path(d) / "m").hf_model(ids).logits)
        out["from_pretrained"] = rel(AutoModelForCausalLM.from_pretrained(Path(d) / "m")(ids).logits)
    return out
