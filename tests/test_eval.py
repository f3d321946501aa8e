"""Perplexity follows the protocol: exp(mean NLL of every predicted token of every window)."""
import json
import math

import torch
import torch.nn.functional as F

import abqc
import abqc.eval
from frontends import corpus, tiny


def test_perplexity_matches_a_direct_computation(tiny_models, tmp_path):
    m = tiny_models["llama"]
    tok = tiny.byte_tokenizer()
    f = tmp_path / "text.txt"
    f.write_text(corpus.load_text("pydoc")[:3000], encoding="utf-8")
    res = abqc.eval.perplexity(m, tok, str(f), seqlen=128, max_windows=5, batch_size=2,
                               json_path=tmp_path / "r.json", progress=False, extra={"label": "x"})
    w = corpus.eval_windows(tok, f.read_text(encoding="utf-8"), 128, 5)
    with torch.no_grad():
        nll = [F.cross_entropy(m(row[None]).logits[0, :-1], row[1:], reduction="none") for row in w]
    expected = math.exp(torch.cat(nll).mean().item())
    assert abs(res["ppl"] - expected) / expected < 1e-5
    assert res["windows"] == 5 and res["tokens_predicted"] == 5 * 127 and res["label"] == "x"
    assert json.loads((tmp_path / "r.json").read_text())["ppl"] == res["ppl"]


def test_quantization_raises_perplexity_more_at_fewer_bits(tiny_models):
    m = tiny_models["opt"]
    tok = tiny.byte_tokenizer()
    w = corpus.eval_windows(tok, corpus.load_text("pydoc")[:4000], 64, 8)
    fp = abqc.eval.perplexity_of_windows(m, w, progress=False)["ppl"]
    p8 = abqc.eval.perplexity_of_windows(abqc.compile(m, wbits=8, abits=8), w, progress=False)["ppl"]
    p2 = abqc.eval.perplexity_of_windows(abqc.compile(m, wbits=2, abits=2), w, progress=False)["ppl"]
    assert abs(p8 - fp) / fp < 0.01 < abs(p2 - fp) / fp
