"""The layer table: path -> packed format and quantization of every lowered linear.

Written into the saved ``quantization_config`` (``layers``, and compressed-tensors-style
``config_groups``), and read back to give a re-captured graph its annotations.
"""
from __future__ import annotations

import json
from typing import Any

from .format import QuantFormat


def _weights_spec(fmt: QuantFormat, ann) -> dict[str, Any]:
    w = {"num_bits": fmt.wbits, "type": "int", "symmetric": bool(ann and ann.weight.symmetric),
         "strategy": "group" if fmt.group_size else "channel", "group_size": fmt.group_size or None}
    if ann is not None and ann.weight.qmax != (1 << fmt.wbits) - 1:
        w["levels"] = ann.weight.qmax + 1  # e.g. the 5-level "2*" grid stored in 3 bits
    return w


def layer_table(cm) -> dict[str, dict[str, Any]]:
    """Path -> packed format and quantization of every lowered linear of `cm`."""
    from ..ir import ANNOT_KEY, is_qlinear
    from ..capture import PATH_KEY

    if getattr(cm, "saved_layers", None):
        return dict(cm.saved_layers)
    out = {}
    for n in cm.graph_module.graph.nodes:
        if not is_qlinear(n):
            continue
        fmt, ann = QuantFormat.parse(n.args[-1]), n.meta.get(ANNOT_KEY)
        out[n.meta[PATH_KEY]] = {
            "format": str(fmt), "wbits": fmt.wbits, "abits": fmt.abits,
            "group_size": fmt.group_size, "act_symmetric": fmt.act_symmetric,
            "weights": _weights_spec(fmt, ann), "method": ann.method if ann else None,
            "bias": n.args[6] is not None,
            "outliers": 0 if n.args[7] is None else int(n.args[7].meta["val"].shape[1])}
    return out


def config_groups(layers: dict[str, dict]) -> dict[str, dict]:
    """compressed-tensors-style groups: linears with one (weights, activations) scheme."""
    groups: dict[str, dict] = {}
    for path, spec in layers.items():
        acts = None if spec["abits"] == 16 else {
            "num_bits": spec["abits"], "type": "int", "symmetric": spec["act_symmetric"],
            "strategy": "token", "dynamic": True}
        key = json.dumps([spec["weights"], acts], sort_keys=True)
        g = groups.setdefault(key, {"targets": [], "weights": spec["weights"],
                                    "input_activations": acts})
        g["targets"].append(path)
    return {f"group_{i}": g for i, g in enumerate(groups.values())}



def annotate_from_layers(gm, layers: dict[str, dict]) -> None:
    """Give the re-captured qlinear nodes their annotations back, from the layer table."""
    from ..capture import PATH_KEY
    from ..config import LinearAnnotation, QuantSpec
    from ..ir import ANNOT_KEY, is_qlinear

    for n in gm.graph.nodes:
        spec = layers.get(n.meta.get(PATH_KEY)) if is_qlinear(n) else None
        if spec is None:
            continue
        w = spec["weights"]
        weight = QuantSpec(bits=spec["wbits"], symmetric=w["symmetric"],
                           granularity="group" if spec["group_size"] else "channel",
                           group_size=spec["group_size"])
        act = None if spec["abits"] == 16 else QuantSpec(
            bits=spec["abits"], symmetric=spec["act_symmetric"], granularity="token", dynamic=True)
        n.meta[ANNOT_KEY] = LinearAnnotation(n.meta[PATH_KEY], weight, act, spec.get("method") or "rtn")
