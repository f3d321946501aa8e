"""Importers: models (Hugging Face directories, hub ids, GGUF, the embedded SmolLM2,
tiny test models) and text corpora (calibration and evaluation windows)."""
from . import corpus, hf, tiny  # noqa: F401
