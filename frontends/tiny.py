"""Tiny random causal LMs built from configs, and a byte tokenizer: for tests, offline."""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from abqc.errors import ConfigError

FAMILIES = ("llama", "qwen2", "mistral", "opt")
VOCAB = 260  # 256 bytes + eos, padded


def tiny_config(family: str, **overrides):
    """A 2-layer, hidden-64 config of `family` (GQA 4/2 heads where the family has it)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, eos_token_id=256, bos_token_id=256, pad_token_id=None)
    if family == "llama":
        cfg = LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2)
    elif family == "mistral":
        cfg = MistralConfig(**common, intermediate_size=128, num_key_value_heads=2, sliding_window=None)
    elif family == "opt":
        cfg = OPTConfig(**{**common, "pad_token_id": 1}, ffn_dim=128, word_embed_proj_dim=64,
                        do_layer_norm_before=True)
    else:
        raise ConfigError(f"tiny model family {family!r} is unknown; allowed: {list(FAMILIES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 model of `family`, reproducible from `seed`, in eval mode."""
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + eos, no merges), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    assert len(vocab) == 256
    vocab["<eos>"] = 256
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    tok.model_max_length = 1 << 30
    return tok
