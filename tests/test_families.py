"""The family table says what the tiny (and real) models of each family look like."""
import pytest

from abqc.calibration.blocks import decoder_blocks
from abqc.families import FAMILIES, SUPPORTED_MODEL_TYPES
from conftest import FAMILIES as TESTED


def test_every_supported_family_is_tested():
    assert set(SUPPORTED_MODEL_TYPES) == set(TESTED)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_entry_matches_its_models(tiny_models, family):
    fam, model = FAMILIES[family], tiny_models[family]
    assert model.config.model_type == fam.model_type
    _, blocks = decoder_blocks(model)
    norm = getattr(blocks[0], fam.input_norm)
    assert ("RMSNorm" in type(norm).__name__) == (fam.norm == "rms")
    assert (norm.bias is not None) == (fam.norm == "layer") if hasattr(norm, "bias") else fam.norm == "rms"
    names = {n.rsplit(".", 1)[-1] for n, _ in blocks[0].named_modules()}
    assert ("gate_proj" in names) == (fam.mlp == "gated")
