import json

from effsft.corpus.normalize import Reject, normalize_row
from effsft.corpus.answer import AnswerRule
from effsft.corpus.synth import SynthSettings, heldout_rows, train_rows

extract_answer = AnswerRule("answer_prefix").extract  # synth responses end with "Answer: <x>"


def _rows(**kw):
    return list(train_rows(SynthSettings(**kw)))


def test_deterministic_for_a_seed():
    assert _rows(rows=300, seed=3) == _rows(rows=300, seed=3)
    assert _rows(rows=300, seed=3) != _rows(rows=300, seed=4)


def test_labels_and_rates():
    rows = _rows(rows=4000, noise=0.2, dup=0.1, garbage=0.05, seed=1)
    metas = [json.loads(r["meta"]) for r in rows]
    n = len(rows)
    garbage = sum(bool(m.get("garbage")) for m in metas)
    dups = sum(bool(m.get("dup")) for m in metas)
    assert abs(garbage / n - 0.05) < 0.02 and abs(dups / n - 0.1) < 0.03
    clean = [(r, m) for r, m in zip(rows, metas) if not m.get("garbage") and not m.get("dup")]
    noisy = [(r, m) for r, m in clean if m["noisy"]]
    assert abs(len(noisy) / len(clean) - 0.2) < 0.03
    for r, m in clean:
        got = extract_answer(r["messages"][-1]["content"])
        assert (got != m["answer"]) == m["noisy"], (r, m)
    assert {m["task"] for _, m in clean} == {"arith", "string", "fact", "count", "format"}


def test_garbage_rows_are_rejected_and_good_rows_accepted():
    for r in _rows(rows=500, garbage=0.2, seed=2):
        raw = json.dumps({"id": r["id"], "messages": r["messages"], "meta": r["meta"]}).encode()
        garbage = json.loads(r["meta"]).get("garbage", False)
        try:
            normalize_row(raw)
            assert not garbage
        except Reject:
            assert garbage


def test_eval_prompts_are_held_out():
    s = SynthSettings(rows=3000, seed=0, length_spread=0)
    train_prompts = {r["messages"][0]["content"].strip() for r in train_rows(s)}
    ev = list(heldout_rows(s, 200, "eval"))
    assert len({e["prompt"] for e in ev}) == 200
    assert not train_prompts & {e["prompt"] for e in ev}
    for e in ev:
        assert extract_answer(e["response"]) == e["answer"]


def test_arith_answers_are_correct():
    for r in _rows(rows=500, noise=0.0, dup=0.0, seed=5, task_mix={"arith": 1}):
        q = r["messages"][0]["content"]
        import re

        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", q).groups()
        expect = eval(f"{a}{op}{b}")
        assert extract_answer(r["messages"][1]["content"]) == str(expect)


def test_extract_answer():
    assert extract_answer("steps\nAnswer: 42\n") == "42"
    assert extract_answer("Answer: 1\nAnswer: 2") == "2"
    assert extract_answer("no answer") is None
