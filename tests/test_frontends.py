"""Model and data importers: tiny models, byte tokenizer, corpora, windows, loading."""
import pytest
import torch

from abqc.errors import ConfigError
from frontends import corpus, hf, tiny


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tiny_models_are_small_reproducible_and_run(family):
    a, b, c = tiny.tiny_model(family, 0), tiny.tiny_model(family, 0), tiny.tiny_model(family, 1)
    assert a.config.model_type == family and a.config.num_hidden_layers == 2
    assert a.config.hidden_size == 64
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    ids = torch.randint(0, 256, (1, 9))
    assert a(ids).logits.shape == (1, 9, a.config.vocab_size)


def test_unknown_tiny_family():
    with pytest.raises(ConfigError, match="'gpt5'.*llama"):
        tiny.tiny_model("gpt5")


def test_byte_tokenizer_round_trips_and_fits_the_vocab():
    tok = tiny.byte_tokenizer()
    text = "Ünïcode ✓ text\n\n  with spaces\tand 漢字"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert max(ids) < tiny.VOCAB and tok.decode(ids) == text


def test_pydoc_corpus_is_long_and_stable():
    a, b = corpus.load_text("pydoc"), corpus.load_text("pydoc")
    assert a == b and len(a) > 100_000


def test_calibration_windows_are_seeded_slices():
    tok = tiny.byte_tokenizer()
    text = corpus.load_text("pydoc")[:50_000]
    stream = corpus.tokenize(tok, text)
    w0 = corpus.calibration_windows(tok, text, nsamples=6, seqlen=64, seed=0)
    assert w0.shape == (6, 64)
    assert torch.equal(w0, corpus.calibration_windows(tok, text, nsamples=6, seqlen=64, seed=0))
    assert not torch.equal(w0, corpus.calibration_windows(tok, text, nsamples=6, seqlen=64, seed=1))
    s = stream.unfold(0, 64, 1)
    for row in w0:
        assert (s == row).all(1).any()
    with pytest.raises(ConfigError, match="seqlen=100000"):
        corpus.calibration_windows(tok, "short", nsamples=1, seqlen=100000)


def test_eval_windows_are_consecutive_and_capped():
    tok = tiny.byte_tokenizer()
    text = "abcdefghij" * 101  # 1010 tokens
    w = corpus.eval_windows(tok, text, seqlen=100)
    assert w.shape == (10, 100)
    assert torch.equal(w.reshape(-1), corpus.tokenize(tok, text)[:1000])
    assert corpus.eval_windows(tok, text, seqlen=100, max_windows=3).shape == (3, 100)


def test_wikitext_protocol(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" = Title = \n a line .\n another\n", encoding="utf-8")
    assert corpus.load_text(str(f)) == " = Title = \n\n a line .\n\n another"
    plain = tmp_path / "notes.txt"
    plain.write_text("x\ny\n", encoding="utf-8")
    assert corpus.load_text(str(plain)) == "x\ny\n"


def test_shared_wikitext_if_present():
    try:
        path = corpus.wikitext2_path()
    except ConfigError:
        pytest.skip("WikiText-2 test file not present next to this checkout")
    text = corpus.load_text("wikitext2")
    assert text.startswith(" = Robert Boulter = ") and text.count("\n\n") == 2890
    assert path.stat().st_size == 1_287_656


def test_missing_sources_are_named():
    with pytest.raises(ConfigError, match="'/nope/x.txt' is not a file"):
        corpus.load_text("/nope/x.txt")
    with pytest.raises(ConfigError, match="'no-such/model-id'.*accepted"):
        hf.load("no-such/model-id")


def test_load_directory_and_tiny_source(tmp_path):
    m, tok = hf.load("tiny:qwen2")
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = hf.load(str(tmp_path))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    assert tok2("hi", add_special_tokens=False).input_ids == tok("hi", add_special_tokens=False).input_ids
