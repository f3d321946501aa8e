"""transformers' ``generate`` driving the `DecodeEngine`.

Sampling, logits processors, streamers, stop strings and stopping criteria stay
transformers' own: only the model call changes. For the length of one ``generate`` call the
tree's ``forward`` is the engine's step, and the cache transformers threads through the
loop is an `EngineCache`, which tells ``generate`` how many tokens the engine holds.

What the engine does not run (beam search, assisted decoding, padded batches, inputs_embeds,
a model it cannot lower: `engine_unsupported`) goes to the tree's own ``generate`` with a
warning naming why, so a call never fails for want of the fast path.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .engine import DecodeEngine, engine_unsupported


class EngineCache(DynamicCache):
    """The cache object ``generate`` carries: the KV tensors live in the engine."""

    def __init__(self, engine: DecodeEngine):
        super().__init__()
        self.engine = engine

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.engine.position

    @property
    def is_compileable(self) -> bool:
        return False


def _step_forward(engine: DecodeEngine):
    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                cache=None, inputs_embeds=None, cache_position=None, logits_to_keep=0,
                use_cache=True, return_dict=True, **kwargs):
        if inputs_embeds is not None:
            raise NotImplementedError("the decode engine takes input_ids, not inputs_embeds")
        state = cache if cache is not None else past_key_values
        if not isinstance(state, EngineCache) or state.engine is not engine:
            raise RuntimeError("the decode engine's forward was called without its EngineCache")
        if cache_position is not None and int(cache_position[0]) != engine.position:
            raise RuntimeError(f"generate asked for position {int(cache_position[0])}, the engine "
                               f"holds {engine.position} tokens")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padded batches")
        all_logits = not (isinstance(logits_to_keep, int) and logits_to_keep == 1)
        logits = engine.step(input_ids, all_logits=all_logits)
        if isinstance(logits_to_keep, int) and logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=state)
    return forward


def fast_path_refusal(tree, args, kwargs) -> str | None:
    """Why this ``generate`` call cannot run on the engine (None: it can)."""
    why = engine_unsupported(tree)
    if why is not None:
        return why
    gc = kwargs.get("generation_config") or tree.generation_config
    beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
    if beams > 1:
        return f"num_beams={beams} (beam search reorders the cache)"
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        return "assisted decoding"
    if kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds"
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        return "a cache passed in by the caller"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "a padded batch (attention_mask with zeros)"
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    pad = kwargs.get("pad_token_id", getattr(gc, "pad_token_id", None))
    eos = kwargs.get("eos_token_id", getattr(gc, "eos_token_id", None))
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if mask is None and isinstance(ids, torch.Tensor) and pad is not None and pad not in eos \
            and bool((ids == pad).any()):
        # transformers infers a padded batch from pad tokens in the prompt (as the tree does)
        return f"a padded batch (the prompt holds pad_token_id={pad} and no attention_mask)"
    return None


@contextlib.contextmanager
def _engine_forward(tree, engine: DecodeEngine):
    tree.forward = _step_forward(engine)
    try:
        yield
    finally:
        del tree.forward  # the class's forward again


class _EngineSlot:
    """Where a tree keeps its engine: not copied with the tree (``copy.deepcopy``, pickling:
    TVM function handles cannot be), so a copy lowers its own engine on first use."""

    __slots__ = ("engine", "warned")

    def __init__(self):
        self.engine = None
        self.warned: set[str] = set()  # the fallback reasons already warned about

    def __deepcopy__(self, memo):
        return _EngineSlot()

    def __reduce__(self):
        return (_EngineSlot, ())


def _slot(tree) -> _EngineSlot:
    slot = tree.__dict__.get("_abqc_engine")
    if slot is None:
        slot = tree.__dict__["_abqc_engine"] = _EngineSlot()
    return slot


def engine_for(tree) -> DecodeEngine:
    """The tree's engine, lowered on first use and kept with the tree (its tensors are the
    tree's own: the engine holds them and the kernels' prepared calls, no copies)."""
    slot = _slot(tree)
    if slot.engine is None:
        slot.engine = DecodeEngine(tree)
    return slot.engine


def generate(tree, *args, **kwargs):
    """``tree.generate(*args, **kwargs)`` with every model call on the decode engine."""
    why = fast_path_refusal(tree, args, kwargs)
    if why is not None:
        slot = _slot(tree)
        if why not in slot.warned:  # once per model and reason, not once per call
            slot.warned.add(why)
            warnings.warn(f"generate runs on the transformers tree (eager, slower), not the decode "
                          f"engine: {why}", stacklevel=3)
        return tree.generate(*args, **kwargs)
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    engine = engine_for(tree)
    gc = kwargs.get("generation_config") or tree.generation_config
    new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None)) or 0
    engine.reset(ids.shape[0], ids.shape[1] + max(new, 1))
    kwargs["cache"] = EngineCache(engine)
    with _engine_forward(tree, engine), torch.no_grad():
        return tree.generate(*args, **kwargs)
