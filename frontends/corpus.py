"""Text corpora and token windows: calibration samples and evaluation windows.

Sources: "pydoc" (the CPython documentation text in `pydoc_data.topics`: always there,
the default calibration corpus), "wikitext2" (the WikiText-2 test split, evaluation
only) or a path to a UTF-8 text file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from abqc.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pydoc", "wikitext2", "<path to a text file>")


def wikitext2_path() -> Path:
    """`$ABQC_WIKITEXT`, else ``<repo>/../shared/data/wikitext-2-raw/wiki.test.raw``."""
    env = os.environ.get("ABQC_WIKITEXT")
    default = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    path = Path(env) if env else default
    if not path.is_file():
        raise ConfigError(f"WikiText-2 test file not found at {path} "
                          f"(looked at $ABQC_WIKITEXT={env!r} and {default})")
    return path


def read_utf8(path: str | os.PathLike) -> str:
    """A text file's contents; a file that is not UTF-8 is a `ConfigError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"text file {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start}); "
                          "calibration and evaluation read UTF-8 text") from None


def wikitext_text(path: str | os.PathLike) -> str:
    """The WikiText protocol: its lines joined with blank lines between them."""
    lines = read_utf8(path).splitlines()
    return "\n\n".join(lines)


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(source: str) -> str:
    """The text of `source`: "pydoc", "wikitext2" or a file (``wiki.*.raw`` files follow
    the WikiText protocol)."""
    if source == "pydoc":
        return pydoc_text()
    if source == "wikitext2":
        return wikitext_text(wikitext2_path())
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"text source {source!r} is not a file; use one of {list(SOURCES)}")
    if path.name.startswith("wiki.") and path.suffix == ".raw":
        return wikitext_text(path)
    return read_utf8(path)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids (no special tokens, no truncation)."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, text: str, nsamples: int = 128, seqlen: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets (reproducible by `seed`)."""
    ids = tokenize(tokenizer, text)
    if len(ids) <= seqlen:
        raise ConfigError(f"calibration text has {len(ids)} tokens; seqlen={seqlen} needs more")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seqlen]; the remainder is dropped."""
    if seqlen < 2:
        raise ConfigError(f"seqlen={seqlen} is too short; use at least 2")
    ids = tokenize(tokenizer, text)
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)
