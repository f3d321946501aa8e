"""Capture: the exported graph computes exactly what the eager model does, at any shape."""
import pytest
import torch
from torch import nn

from abqc.capture import PATH_KEY, capture, check_model, linear_nodes
from abqc.errors import UnsupportedModelError

from conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_eager_at_several_shapes(tiny_models, family):
    m = tiny_models[family]
    gm = capture(m)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in [(2, 24), (1, 7), (3, 1), (1, 130)]:
            ids = torch.randint(0, m.config.vocab_size, shape, generator=g)
            ref = m(input_ids=ids, use_cache=False).logits
            assert torch.allclose(gm(ids), ref, atol=1e-5, rtol=0), (family, shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_node_knows_its_module_path(tiny_models, family):
    m = tiny_models[family]
    gm = capture(m)
    paths = [n.meta[PATH_KEY] for n in linear_nodes(gm)]
    expected = {name for name, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert set(paths) == expected and len(paths) == len(expected)
    assert any(p.endswith("layers.1.mlp.down_proj") or p.endswith("layers.1.fc2") for p in paths)


def test_unsupported_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*supported"):
        check_model(gpt2)
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face causal LM"):
        check_model(nn.Sequential(nn.Linear(4, 4)))

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "llama"})()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        check_model(NoLinear())


def test_capture_retries_with_auto_dims_when_export_refuses_the_declared_ones(tiny_models, monkeypatch):
    """torch 2.11 refuses the declared seq range for some models ("Constraints violated");
    capture then exports with Dim.AUTO, and the graph must still take any batch and length."""
    from torch.export import Dim

    from abqc.capture import capture

    real = torch.export.export
    seen = []

    def export(*args, dynamic_shapes=None, **kwargs):
        seen.append(dynamic_shapes["input_ids"][1])
        if not isinstance(dynamic_shapes["input_ids"][1], type(Dim.AUTO)):
            raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
                                              "Constraints violated (seq)!")
        return real(*args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    m = tiny_models["llama"]
    gm = capture(m)
    assert len(seen) == 2 and seen[1] is Dim.AUTO
    for shape in ((1, 5), (3, 40)):
        ids = torch.randint(0, 256, shape)
        with torch.no_grad():
            assert torch.allclose(gm(ids), m(input_ids=ids, use_cache=False).logits, atol=1e-5)
