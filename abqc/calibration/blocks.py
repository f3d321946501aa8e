"""Find a model's decoder blocks and cache what block 0 receives, without running the rest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder blocks: the longest ModuleList holding linears."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and any(
                isinstance(m, nn.Linear) for m in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no list of decoder blocks to calibrate")
    return best


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (everything needed has been seen)."""


@dataclass
class BlockInput:
    """One batch as block 0 sees it: hidden states plus the other arguments (masks, rotary)."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]

    def to(self, device) -> "BlockInput":
        """A copy with every tensor (also inside tuples, e.g. rotary cos/sin) on `device`."""
        return BlockInput(_to(self.hidden, device), _to(self.args, device),
                          {k: _to(v, device) for k, v in self.kwargs.items()})


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                         batch_size: int) -> list[BlockInput]:
    """Run each batch of `windows` up to block 0 and keep its inputs."""
    cached: list[BlockInput] = []

    def hook(module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        cached.append(BlockInput(hidden.detach(), rest, kwargs))
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i:i + batch_size], use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return cached


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """The block's output hidden states for one cached batch."""
    out = block(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
