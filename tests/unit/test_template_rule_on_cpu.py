"""One template rule: every job tokenises the same rows into the same ids and label masks.

The same conversations go through each job's own entry point: SFT's Ray Data map function,
select's LM-scorer encoding (and the length scorer, IFD's pairs, LESS's rows, the lm embedder's
text), eval's perplexity and generation prompts, GRPO's prompt reader and prune's calibration
documents. Three tokenizers: one without a chat template (the documented default applies), a
tiny one with a ChatML template, and SmolLM2's real one. Then the numbers: eval's response NLL,
select's CE and SFT's loss agree on every row.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from effsft.config import build_config
from effsft.corpus.tokenize import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, TemplateError, collate, encode_chat,
                                    encode_prompt, prompt_turns, render, resolve_template)
from effsft.models.loading import load_tokenizer
from effsft.models.tiny import build_tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

ROWS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42\nAnswer: 42"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse 'planet'."},
     {"role": "assistant", "content": "Answer: tenalp"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "blue"},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Answer: red"}],
    [{"role": "user", "content": "  spaces  and\ttabs "}, {"role": "assistant", "content": " leading space"}],
]


def _tiny_dir(tmp_path_factory, template):
    tok = build_tokenizer([m["content"] for r in ROWS for m in r] * 10 + ["<|im_start|><|im_end|>"] * 5, 400)
    if template is None:
        tok.chat_template = None
    else:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = template
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert (cfg.get("chat_template") is None) == (template is None) or (d / "chat_template.jinja").exists()
    return d


@pytest.fixture(scope="module", params=["no_template", "chatml", "smollm2"])
def tok_dir(request, tmp_path_factory):
    if request.param == "smollm2":
        return request.getfixturevalue("real_model_dir")
    return _tiny_dir(tmp_path_factory, None if request.param == "no_template" else CHATML)


def _model_for(tok_dir, tok):
    if (tok_dir / "config.json").exists():
        from effsft.models.loading import load_model

        return load_model(tok_dir, dtype="float32")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def _sft_rows(tok_dir, train_on):
    """SFT's path: the Ray Data map function over canonical rows."""
    from effsft.train.data import tokenize_table

    batch = pa.table({"id": [f"r{i}" for i in range(len(ROWS))], "messages": ROWS,
                      "source": [f"f:{i}" for i in range(len(ROWS))]})
    out = tokenize_table(batch, str(tok_dir), max_len=4096, train_on=train_on, truncation="left").to_pylist()
    assert all(r["status"] == "ok" for r in out)
    return [(r["input_ids"], r["labels"]) for r in out]


def test_template_resolution(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.effsft_template == resolve_template(tok)[1] in ("chat", "default")
    assert load_tokenizer(tok_dir, template="default").chat_template == DEFAULT_CHAT_TEMPLATE
    if tok.effsft_template == "chat":
        assert "<|im_start|>" in render(tok, ROWS[0])
    else:
        assert render(tok, ROWS[0]).startswith("Human: What is 12 + 30?\nAssistant:\n")
        with pytest.raises(TemplateError, match="model.template"):
            load_tokenizer(tok_dir, template="chat")


def test_every_job_encodes_the_same_ids_and_labels(tok_dir, tmp_path):
    from effsft.grpo.config import GRPOConfig
    from effsft.grpo.prompts import read_prompts
    from effsft.prune.calibration import tokenize_documents
    from effsft.select.less import encode_rows
    from effsft.select.lm_scores import encode_pairs, length_scores

    tok = load_tokenizer(tok_dir)
    sft_last = _sft_rows(tok_dir, "last")
    sft_all = _sft_rows(tok_dir, "all")
    for (ids, labels), msgs in zip(sft_all, ROWS):  # eval's perplexity path: encode_chat, train_on all
        e = encode_chat(tok, msgs, 4096)
        assert (e.input_ids, e.labels) == (ids, labels)
    pairs = encode_pairs(tok, ROWS)                   # select's LM scorers (ce/ppl/entropy/ifd)
    lengths = length_scores(tok, ROWS)                # select's length scorer
    less_rows, _ = encode_rows(tok, ROWS, 4096)       # LESS's training-row gradients
    for i, ((ids, labels), p, lr) in enumerate(zip(sft_last, pairs, less_rows)):
        n_prompt = next(t for t, y in enumerate(labels) if y != IGNORE_INDEX)
        assert p.prompt_ids == ids[:n_prompt] and p.answer_ids == ids[n_prompt:]
        assert all(y != IGNORE_INDEX for y in labels[n_prompt:])  # the answer is one contiguous span
        assert lengths["prompt_tokens"][i] == n_prompt and lengths["total_tokens"][i] == len(ids)
        assert (list(lr[0]), list(lr[1])) == (ids, labels)
        # eval's generation prompt is the prompt the answer was scored after
        assert encode_prompt(tok, prompt_turns(ROWS[i])) == ids[:n_prompt]
    # prune's calibration documents and the lm embedder: the whole rendered conversation
    assert tokenize_documents(tok, ROWS) == [ids for ids, _ in sft_all]
    assert [tok(render(tok, m), add_special_tokens=False)["input_ids"] for m in ROWS] == [i for i, _ in sft_all]
    # GRPO's prompt reader (a trailing assistant turn is dropped): the same prompt ids
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"messages": ROWS, "answer": ["42", "tenalp", "red", "x"]}), path)
    cfg = build_config(GRPOConfig, {"model": {"path": str(tok_dir)}, "output": str(tmp_path / "out"),
                                    "data": {"path": str(path)}, "train": {"num_workers": 1},
                                    "rollout": {"prompts_per_step": 1}})
    prompts, counts = read_prompts(cfg, tmp_path / "rejects.parquet")
    assert counts["prompts_ok"] == len(ROWS)
    assert prompts.ids == [p.prompt_ids for p in pairs]


def test_eval_select_and_sft_agree_on_the_numbers(tok_dir):
    from effsft.eval.metrics import perplexity
    from effsft.select.lm_scores import lm_score_rows
    from effsft.sft.loss import sft_loss

    tok = load_tokenizer(tok_dir)
    model = _model_for(tok_dir, tok)
    single_turn = [r for r in ROWS if sum(m["role"] == "assistant" for m in r) == 1]
    ce = lm_score_rows(model, tok, single_turn, compute_ifd=False)["ce"]
    for row, c in zip(single_turn, ce):
        eval_nll = perplexity(model, tok, [row], max_len=4096)["mean_nll"]
        with torch.no_grad():
            loss, _ = sft_loss(model, collate([encode_chat(tok, row, 4096)], tok.pad_token_id))
        assert eval_nll == pytest.approx(c, rel=1e-5) and float(loss) == pytest.approx(c, rel=1e-5)
    assert np.isfinite(ce).all()


def test_output_tokenizer_keeps_the_resolved_template(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir, template="default")
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.chat_template == DEFAULT_CHAT_TEMPLATE and again.effsft_template == "default"
    assert copy.deepcopy(again).chat_template == DEFAULT_CHAT_TEMPLATE
