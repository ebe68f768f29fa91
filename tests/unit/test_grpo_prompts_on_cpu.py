"""GRPO prompt reading: every row is a prompt, a filtered row, or a line of rejects.parquet."""
import json

import pyarrow.parquet as pq
import pytest

from effsft.config import ConfigError, build_config
from effsft.corpus.tokenize import render
from effsft.grpo.config import GRPOConfig
from effsft.grpo.prompts import read_prompts
from effsft.models.loading import load_tokenizer


def _cfg(model, data, tmp_path, **data_keys):
    return build_config(GRPOConfig, {"model": {"path": str(model)}, "output": str(tmp_path / "out"),
                                     "data": {"path": str(data), **data_keys}})


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = [json.dumps({"id": f"g{i}", "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                {"role": "assistant", "content": str(2 * i)}],
                    "answer": str(2 * i), "task": "arith"}) for i in range(4)]
BAD = [
    "{not json",                                                               # parse_error
    json.dumps({"answer": "1", "task": "arith"}),                              # missing_field
    json.dumps({"messages": 7, "answer": "1", "task": "arith"}),               # wrong_type
    json.dumps({"messages": "word " * 400, "answer": "1", "task": "arith"}),   # too_long (a string prompt)
]


def test_every_row_accounted_for(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "p.jsonl", GOOD[:2] + BAD + GOOD[2:] + [
        json.dumps({"messages": "count me out", "task": "other"})])  # filtered by data.tasks
    cfg = _cfg(tiny_model_dir, data, tmp_path, tasks=["arith"], max_prompt_tokens=64)
    prompts, c = read_prompts(cfg, tmp_path / "rejects.parquet")
    assert (c["prompts_in"], c["prompts_ok"], c["prompts_rejected"], c["prompts_filtered_by_task"]) == (8, 4, 4, 1)
    assert c["prompts_rejected_by_reason"] == {"missing_field": 1, "parse_error": 1, "too_long": 1,
                                               "wrong_type": 1}
    rejects = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    assert [r["src_row"] for r in rejects] == [2, 3, 4, 5]
    assert all(r["src_file"] == str(data) and r["detail"] for r in rejects)
    assert rejects[0]["raw"] == b"{not json"
    # the trailing assistant turn (the reference answer) is not part of the prompt
    assert prompts.columns["answer"] == ["0", "2", "4", "6"] and "messages" not in prompts.columns
    tok = load_tokenizer(str(tiny_model_dir))
    assert prompts.texts[1] == render(tok, [{"role": "user", "content": "What is 1 + 1?"}],
                                      add_generation_prompt=True)
    assert len(prompts.ids) == 4 and all(prompts.ids)


def test_limit_stops_reading_and_directories_are_read(tiny_model_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write(shards / "a.jsonl", GOOD[:2])
    _write(shards / "b.jsonl", BAD[:1] + GOOD[2:])
    prompts, c = read_prompts(_cfg(tiny_model_dir, shards, tmp_path), tmp_path / "r1.parquet")
    assert (c["prompts_in"], c["prompts_ok"], c["prompts_rejected"]) == (5, 4, 1)
    prompts, c = read_prompts(_cfg(tiny_model_dir, shards, tmp_path, limit=3), tmp_path / "r2.parquet")
    assert (c["prompts_in"], c["prompts_ok"], c["prompts_rejected"]) == (3, 2, 1)


@pytest.mark.parametrize("keys, message", [
    ({"prompt_column": "question"}, "data.prompt_column"),
    ({"tasks": ["arith"]}, "data.tasks"),
    ({"max_prompt_tokens": 1}, "no usable prompts"),
])
def test_bad_data_config_names_the_key(tiny_model_dir, tmp_path, keys, message):
    data = _write(tmp_path / "p.jsonl", [json.dumps({"messages": "hi there", "answer": "1"})])
    with pytest.raises(ConfigError, match=message):
        read_prompts(_cfg(tiny_model_dir, data, tmp_path, **keys), tmp_path / "rejects.parquet")


def test_prefix_grouping_on_off_survive_yaml(tmp_path):
    """``prefix_grouping=on`` on the command line (YAML reads a bare on/off as a boolean)."""
    from effsft.config import load_config
    from effsft.grpo.config import GRPOConfig

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}], "answer": "1"}\n')
    for word in ("on", "off", "auto"):
        cfg = load_config(GRPOConfig, None, [f"model.path={tmp_path}", f"output={tmp_path / 'o'}",
                                             f"data.path={prompts}", f"prefix_grouping={word}"])
        assert cfg.prefix_grouping == word
