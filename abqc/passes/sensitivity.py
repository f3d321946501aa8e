"""SensitivityAnalysis: which linears hurt most when quantized, measured on calibration data.

For a given (wbits, abits), quantize one thing at a time with RTN (weights per channel;
activations per token, dynamic) and measure the increase of the model's next-token loss
(mean NLL) on the calibration windows over the float graph:

- per component type (the last part of the module path: q_proj, ..., down_proj), its
  weights alone and its input activations alone, in every block at once;
- per block, every linear of the block (weights and activations).

The graph is not changed: the quantized linears are simulated by an Interpreter. The
report goes to the program's `Sensitivity` fact (and to `out` as JSON when given);
`format_sensitivity` prints it as a table.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Interpreter
from tqdm.auto import tqdm

from ..atomic import write_json
from ..capture import is_linear, module_path
from ..config import FLOAT_BITS, QuantSpec, weight_spec
from ..ir import ANNOT_KEY
from ..quantizer import compute_qparams, dequantize, fake_quantize, rtn
from ..facts import Annotated, Sensitivity, facts
from .base import Pass, PassContext
from .graph_utils import get_tensor

log = logging.getLogger("abqc")


class _Simulated(Interpreter):
    """Runs the float graph with RTN weights and/or fake-quant inputs at chosen linears."""

    def __init__(self, gm: GraphModule, weights: dict[str, torch.Tensor], act: QuantSpec | None):
        super().__init__(gm)
        self.weights, self.act = weights, act
        self.w_paths: set[str] = set()
        self.a_paths: set[str] = set()

    def run_node(self, n):
        if is_linear(n):
            p = module_path(n)
            if p in self.w_paths or p in self.a_paths:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                x, w = args[0], args[1]
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                if p in self.a_paths and self.act is not None:
                    s, z = compute_qparams(x, self.act.qmax, self.act.symmetric)
                    x = fake_quantize(x, s, z, self.act.qmax)
                if p in self.w_paths:
                    w = self.weights[p].to(w.dtype)
                return F.linear(x, w, b)
        return super().run_node(n)


@torch.no_grad()
def _loss(interp: _Simulated, windows: torch.Tensor, batch_size: int) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        logits = interp.run(ids)
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                     ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return nll / count


def _block(path: str) -> str | None:
    """"model.layers.3.mlp.down_proj" -> "model.layers.3" (the last numbered prefix)."""
    parts = path.split(".")
    idx = [i for i, s in enumerate(parts) if s.isdigit()]
    return ".".join(parts[:idx[-1] + 1]) if idx else None


class SensitivityAnalysis(Pass):
    """Measure the loss increase from quantizing each component type and each block."""

    requires = (Annotated,)
    ensures = (Sensitivity,)

    def __init__(self, wbits: int | str = 4, abits: int = 4, out: str | None = None,
                 batch_size: int = 4):
        self.wbits, self.abits, self.out, self.batch_size = wbits, abits, out, batch_size

    def transform(self, gm: GraphModule) -> GraphModule:
        from .calibrate import calibration_windows

        t0 = time.perf_counter()
        windows = calibration_windows(PassContext.current())
        paths = [module_path(n) for n in gm.graph.nodes
                 if is_linear(n) and n.meta.get(ANNOT_KEY) is not None]
        if not paths:
            raise ValueError("SensitivityAnalysis needs annotated linears: run AnnotateQuant first")
        wspec = weight_spec(self.wbits, False, 0)
        aspec = None if self.abits == FLOAT_BITS else QuantSpec(self.abits, granularity="token", dynamic=True)
        weights = {}
        for n in gm.graph.nodes:
            if is_linear(n) and module_path(n) in paths:
                w = get_tensor(gm, n.args[1].target)
                codes, s, z = rtn(w.detach().float(), wspec)
                weights[module_path(n)] = dequantize(codes, s, z)
        interp = _Simulated(gm, weights, aspec)
        base = _loss(interp, windows, self.batch_size)
        kinds = ["weight"] + (["act"] if aspec is not None else [])
        components = sorted({p.rsplit(".", 1)[-1] for p in paths})
        blocks = sorted({_block(p) for p in paths if _block(p)}, key=lambda b: int(b.rsplit(".", 1)[1]))
        jobs = [("component", c, k) for c in components for k in kinds] + \
               [("block", b, "all") for b in blocks]
        report: dict[str, Any] = {"wbits": self.wbits, "abits": self.abits, "base_loss": base,
                                  "windows": list(windows.shape), "component": {}, "block": {}}
        for scope, key, kind in tqdm(jobs, desc="sensitivity", unit="run"):
            chosen = {p for p in paths if (p.rsplit(".", 1)[-1] == key if scope == "component"
                                           else _block(p) == key)}
            interp.w_paths = chosen if kind in ("weight", "all") else set()
            interp.a_paths = chosen if kind in ("act", "all") else set()
            delta = _loss(interp, windows, self.batch_size) - base
            if scope == "component":
                report["component"].setdefault(key, {})[kind] = delta
            else:
                report["block"][key] = delta
        report["seconds"] = round(time.perf_counter() - t0, 1)
        facts(gm).add(Sensitivity(report))
        if self.out:
            write_json(self.out, report)
        log.info("sensitivity (W%s A%s, base loss %.4f):\n%s", self.wbits, self.abits, base,
                 format_sensitivity(report))
        return gm


def format_sensitivity(report: dict[str, Any]) -> str:
    """The report as text: loss increase per component (weights, activations) and per block."""
    lines = [f"{'component':<14} {'weights':>10} {'acts':>10}   (loss increase, base "
             f"{report['base_loss']:.4f}, W{report['wbits']} A{report['abits']})"]
    for c, d in sorted(report["component"].items(), key=lambda kv: -max(kv[1].values())):
        act = d.get("act", math.nan)
        lines.append(f"{c:<14} {d['weight']:>10.5f} {act:>10.5f}")
    lines.append(f"{'block':<24} {'all linears':>12}")
    for b, d in report["block"].items():
        lines.append(f"{b:<24} {d:>12.5f}")
    return "\n".join(lines)
