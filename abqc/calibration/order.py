"""True-sequential order, derived from the graph: which linears of a block to solve together.

A linear's *level* is one more than the highest level of any linear its input depends
on. Linears of one block with the same level read inputs that no other linear of that
level produced, so they are solved together, after every lower level: Llama gives
[q, k, v] -> [o] -> [gate, up] -> [down]; OPT [q, k, v] -> [out_proj] -> [fc1] -> [fc2].
"""
from __future__ import annotations

import re
from collections import defaultdict

from torch.fx import GraphModule

from ..capture import is_linear, module_path


def linear_levels(gm: GraphModule) -> dict[str, int]:
    """Module path -> level, for every linear of the graph (one topological pass)."""
    level: dict = {}
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        deps = [level.get(a, 0) for a in node.all_input_nodes]
        if is_linear(node):
            # the weight side (quantize/dequantize of a parameter) has level 0: only the
            # activation input orders linears
            lv = 1 + level.get(node.args[0], 0)
            out[module_path(node)] = lv
            level[node] = lv
        else:
            level[node] = max(deps, default=0)
    return out


def block_of(path: str, block_prefix: str) -> int | None:
    """The block index of `path` under `block_prefix` (e.g. "model.layers"), or None."""
    m = re.match(re.escape(block_prefix) + r"\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def sequential_groups(gm: GraphModule, block_prefix: str, paths: set[str] | None = None
                      ) -> dict[int, list[list[str]]]:
    """block index -> groups of module paths, in solve order (lowest level first)."""
    by_block: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, lv in linear_levels(gm).items():
        b = block_of(path, block_prefix)
        if b is None or (paths is not None and path not in paths):
            continue
        by_block[b][lv].append(path)
    return {b: [sorted(levels[lv]) for lv in sorted(levels)] for b, levels in sorted(by_block.items())}
