"""lm-eval: a compiled model runs as `HFLM(pretrained=cm.hf_model)` on a small local task."""
import json

import pytest
import torch

import abqc
from abqc.runtime.qlinear import QuantLinear
from frontends.tiny import byte_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Water is", "choices": ["dry", "wet", "tall", "red"], "answer": 1},
    {"question": "A cat says", "choices": ["moo", "meow"], "answer": 1},
]

TASK = """\
task: abqc_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) from the model's logits, computed here."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _score(resp) -> float:
    """lm-eval logs each choice's response as [[loglikelihood, is_greedy]] (or [(ll, greedy)])."""
    first = resp[0]
    return float(first[0] if isinstance(first, (list, tuple)) else first)


def test_hflm_runs_a_local_task_on_the_kernels(tiny_models, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = byte_tokenizer()
    cm = abqc.compile(tiny_models["llama"], wbits=4, abits=8, tokenizer=tok)
    calls = []
    for m in cm.hf_model.modules():
        if isinstance(m, QuantLinear):
            m.register_forward_hook(lambda *_: calls.append(1))

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "abqc_tiny_mc.yaml").write_text(TASK.format(data=data))
    lm = HFLM(pretrained=cm.hf_model, tokenizer=tok, batch_size=1, max_length=128)
    out = simple_evaluate(model=lm, tasks=["abqc_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                          log_samples=True)

    assert calls, "lm-eval did not run the quantized linears"
    samples = out["samples"]["abqc_tiny_mc"]
    assert len(samples) == len(DOCS)
    correct = 0
    float_ll = []
    for s in samples:
        doc = s["doc"]
        got = [_score(r) for r in s["resps"]]
        want = [_loglikelihood(cm.hf_model, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        correct += int(max(range(len(want)), key=want.__getitem__) == doc["answer"])
        float_ll += [_loglikelihood(tiny_models["llama"], tok, doc["question"], " " + c) for c in doc["choices"]]
    assert out["results"]["abqc_tiny_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))
    # the scores are the quantized model's, not the float one's
    flat = [_score(r) for s in samples for r in s["resps"]]
    assert max(abs(a - b) for a, b in zip(flat, float_ll)) > 1e-3


def test_abqc_lm_eval_runs_a_local_task_on_a_saved_model(tiny_models, tmp_path, capsys):
    """`abqc lm-eval DIR --tasks ... --include-path ...`: the saved model as loaded (no
    recompile), scored by lm-eval; the accuracy is the one its own logits give."""
    from abqc.cli import main

    tok = byte_tokenizer()
    d = tmp_path / "w4a8"
    abqc.compile(tiny_models["llama"], wbits=4, abits=8, tokenizer=tok).save(d)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tasks / "abqc_tiny_mc.yaml").write_text(TASK.format(data=data))
    js = tmp_path / "lm.json"
    assert main(["-q", "lm-eval", str(d), "--tasks", "abqc_tiny_mc", "--include-path", str(tasks),
                 "--max-length", "128", "--json", str(js)]) == 0
    assert "abqc_tiny_mc" in capsys.readouterr().out
    res = json.loads(js.read_text())
    cm = abqc.load(d)
    want = sum(max(range(len(doc["choices"])), key=lambda i: _loglikelihood(
        cm.hf_model, tok, doc["question"], " " + doc["choices"][i])) == doc["answer"] for doc in DOCS)
    assert res["results"]["abqc_tiny_mc"]["acc,none"] == pytest.approx(want / len(DOCS))
    assert res["config"]["wbits"] == 4 and res["abqc_version"] == abqc.__version__
    assert main(["-q", "lm-eval", str(d), "--tasks", "no_such_task", "--include-path", str(tasks)]) == 2
    assert "unknown lm-eval task(s) ['no_such_task']" in capsys.readouterr().err
