import pytest
import torch

from effsft.corpus.tokenize import IGNORE_INDEX, TemplateError, collate, encode_chat, encode_prompt, render
from effsft.models.tiny import build_tokenizer

TEXTS = ["Human: hello there\nAssistant:\nthe answer is 42</s>", "Compute 12 + 30. Answer: 42",
         "Reverse the string 'planet'. tenalp", "system prompt: be brief"] * 20


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS, vocab_size=300)


def _labelled(tok, e):
    return tok.decode([t for t, y in zip(e.input_ids, e.labels) if y != IGNORE_INDEX])


CONV = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "the answer is 42"},
        {"role": "user", "content": "Compute 12 + 30."},
        {"role": "assistant", "content": "Answer: 42"}]


def test_labels_only_on_assistant_turns(tok):
    e = encode_chat(tok, CONV, max_len=512)
    assert _labelled(tok, e) == "the answer is 42</s>\nAnswer: 42</s>\n"
    last = encode_chat(tok, CONV, max_len=512, train_on="last")
    assert _labelled(tok, last) == "Answer: 42</s>\n"
    assert e.n_response == sum(y != IGNORE_INDEX for y in e.labels)
    # the prompt (system + user) is never labelled
    assert all(y == IGNORE_INDEX for y in e.labels[: e.n_prompt])


def test_prompt_tokens_are_a_prefix_of_the_training_tokens(tok):
    e = encode_chat(tok, CONV[:3], max_len=512)
    p = encode_prompt(tok, CONV[:2])
    assert e.input_ids[: len(p)] == p
    assert e.labels[len(p)] != IGNORE_INDEX


def test_truncation_never_drops_the_response(tok):
    full = encode_chat(tok, CONV, max_len=10_000)
    tail = full.input_ids[-full.n_response:]
    e = encode_chat(tok, CONV, max_len=len(full.input_ids) - 3)
    assert e.truncated and not e.too_long and len(e.input_ids) == len(full.input_ids) - 3
    assert e.input_ids[-len(tail):] == tail
    assert _labelled(tok, e).endswith("Answer: 42</s>\n")
    # the final response alone does not fit: flagged, never cut
    n_last = len(encode_chat(tok, CONV, 10_000, train_on="last").input_ids) - \
        encode_chat(tok, CONV, 10_000, train_on="last").n_prompt
    assert encode_chat(tok, CONV, max_len=n_last - 1).too_long
    assert encode_chat(tok, CONV, max_len=len(full.input_ids) - 1, truncation="drop").too_long


def test_model_chat_template_is_used(tok):
    import copy

    t2 = copy.deepcopy(tok)
    t2.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text = render(t2, CONV[1:3])
    assert text.startswith("<|user|>hello there")
    e = encode_chat(t2, CONV[1:3], max_len=512)
    assert _labelled(t2, e) == "the answer is 42<|end|>"


def test_non_prefix_stable_template_raises(tok):
    import copy

    t2 = copy.deepcopy(tok)
    t2.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError):
        encode_chat(t2, CONV[1:3], max_len=512)


def test_collate_pads_and_masks(tok):
    a = encode_chat(tok, CONV[1:3], 512)
    b = encode_chat(tok, CONV, 512)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()
    left = collate([a, b], tok.pad_token_id, side="left")
    assert left["attention_mask"][0, -1] == 1 and left["attention_mask"][0, 0] == 0
    assert torch.equal(left["input_ids"][0, -len(a.input_ids):], torch.tensor(a.input_ids))


def test_untrainable_rows_carry_their_reject_record(tiny_model_dir):
    """``tokenize_table`` (the SFT data map): every row that is not trained on keeps its source
    and reason for ``rejects.parquet``, from raw (normalised) rows and from canonical shards."""
    import json

    import pyarrow as pa
    import pyarrow.compute as pc

    from effsft.corpus.normalize import normalize_table
    from effsft.train.data import _not_ok, tokenize_table

    raws = [json.dumps({"prompt": "hi", "response": "there " * 200}),  # too long for 64 tokens
            "{not json",                                                 # normaliser reject
            json.dumps({"prompt": "a", "response": "b"})]                # fine
    raw = pa.table({"raw": pa.array([r.encode() for r in raws], pa.binary()),
                    "src_file": ["f.jsonl"] * 3, "src_row": [0, 1, 2]})
    norm = normalize_table(raw)
    out = tokenize_table(norm, str(tiny_model_dir), 64, "all", "left")
    assert out["status"].to_pylist() == ["too_long", "rejected", "ok"]
    rej = _not_ok(out).to_pylist()
    assert [(r["src_file"], r["src_row"], r["reason"]) for r in rej] == [
        ("f.jsonl", 0, "too_long"), ("f.jsonl", 1, "parse_error")]
    assert "tokenize.max_len=64" in rej[0]["detail"] and rej[0]["id"] and rej[0]["raw"] is None
    assert rej[1]["raw"] == b"{not json" and rej[1]["id"] is None
    # canonical shards ("source" = "<file>:<row>") give the same record
    canon = norm.filter(pc.is_null(norm["reject_reason"])).select(["id", "messages", "source", "meta"])
    again = _not_ok(tokenize_table(canon, str(tiny_model_dir), 64, "all", "left")).to_pylist()
    assert again == [rej[0]]
