import json

import pytest

from effsft.corpus.normalize import NormalizeOptions, Reject, content_id, normalize_row

CANON = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]

FORMATS = {
    "messages": {"messages": CANON},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2+2?"},
                                   {"from": "gpt", "value": "4"}]},
    "alpaca": {"instruction": "What is 2+2?", "input": "", "output": "4"},
    "prompt_response": {"prompt": "What is 2+2?", "response": "4"},
    "openai_parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                                {"type": "text", "text": "2+2?"}]},
                                  {"role": "assistant", "content": "4"}]},
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_gives_the_same_record(name):
    rec = normalize_row(json.dumps(FORMATS[name]).encode())
    assert rec["messages"] == CANON
    assert rec["id"] == content_id(CANON)  # no given id: content hash, same for every format


def test_alpaca_input_and_system():
    rec = normalize_row(json.dumps({"instruction": "Add", "input": "2 and 2", "output": "4",
                                    "system": "Be brief."}).encode())
    assert rec["messages"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Add\n\n2 and 2"},
                               {"role": "assistant", "content": "4"}]


def test_given_id_and_meta_kept():
    rec = normalize_row(json.dumps({"id": 17, "prompt": "p", "response": "r", "lang": "en",
                                    "meta": {"task": "t"}}).encode())
    assert rec["id"] == "17"
    meta = json.loads(rec["meta"])
    assert meta["lang"] == "en" and meta["task"] == "t" and meta["format"] == "prompt_response"


BAD = [
    (b"not json", "parse_error"),
    (b"[1, 2]", "parse_error"),
    (b"", "empty_line"),
    (b'{"prompt": "\xff", "response": "r"}', "invalid_utf8"),
    (b'{"foo": 1}', "unknown_format"),
    (b'{"messages": "hi"}', "wrong_type"),
    (b'{"messages": [1]}', "wrong_type"),
    (b'{"messages": []}', "missing_field"),
    (b'{"messages": [{"content": "x"}]}', "missing_field"),
    (b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "bad_roles"),
    (b'{"messages": [{"role": "assistant", "content": "y"}]}', "bad_roles"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}', "bad_roles"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "empty_response"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}', "empty_response"),
    (b'{"messages": [{"role": "user", "content": {"img": 1}}, {"role": "assistant", "content": "y"}]}', "non_text_content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "y"}]}', "non_text_content"),
    (b'{"prompt": 3, "response": "r"}', "wrong_type"),
    (b'{"prompt": null, "response": "r"}', "missing_field"),
    (b'{"prompt": "p", "response": ""}', "empty_response"),
    (b'{"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}', "bad_roles"),
]


@pytest.mark.parametrize("raw,reason", BAD)
def test_bad_rows_rejected_with_reason(raw, reason):
    with pytest.raises(Reject) as e:
        normalize_row(raw)
    assert e.value.reason == reason


def test_too_large():
    raw = json.dumps({"prompt": "x" * 100, "response": "y"}).encode()
    with pytest.raises(Reject) as e:
        normalize_row(raw, NormalizeOptions(max_row_bytes=50))
    assert e.value.reason == "too_large"
    assert normalize_row(raw, NormalizeOptions(max_row_bytes=len(raw)))["messages"][1]["content"] == "y"
