"""SelectIT token/sentence/model-level scores vs hand values; failing rows are isolated."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from effsft.select import selectit as S

WORDS = ["<pad>", "<unk>", "<s>", "1", "2", "3", "4", "5", "The", "answer", "is:", "Instruction:", "Response:",
         "rate", "this", "what", "color", "sky", "blue", "red", "ok", "BOOM"]


def _word_tok(words):
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module")
def tok():
    return _word_tok(WORDS)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": c} for r, c in zip(roles, turns)]


ROWS = [_conv("what color sky", "blue"), _conv("rate this", "ok", "what color", "red red"), _conv("sky", "blue blue")]
PROMPTS = ["rate this", "rate"]


def _naive_s_tok(p):
    p = [x / sum(p) for x in p]
    b = max(range(len(p)), key=lambda k: p[k])
    return (b + 1) * sum(p[b] - q for q in p) / (len(p) - 1)


def test_token_level_hand_value():
    assert S.token_level_score(np.array([0.1, 0.2, 0.4, 0.2, 0.1])) == pytest.approx(0.75)
    # unnormalised probabilities: P' = P / ΣP first
    assert S.token_level_score(np.array([0.0, 0.0, 0.0, 0.1, 0.1])) == pytest.approx(4 * 0.5 * 3 / 4)


def test_sentence_and_model_level_hand_values():
    s_tok = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    std = np.sqrt(2.0 / 3.0)  # population std of 1,2,3
    np.testing.assert_allclose(S.sentence_level_score(s_tok), [2.0 / (1 + 0.2 * std), 2.0])
    got = S.model_level_score([np.array([1.0, np.nan]), np.array([3.0, 1.0])], [1_000, 3_000])
    assert got[0] == pytest.approx(0.25 * 1 + 0.75 * 3) and np.isnan(got[1])


def test_digit_ids_resolved_and_single_tokens(tok):
    assert S.resolve_digit_ids(tok) == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError):
        S.resolve_digit_ids(_word_tok([w for w in WORDS if w != "4"]))


def test_prompt_drops_earliest_pairs(tok):
    pairs = S.conversation_pairs(ROWS[1])
    assert pairs == [("rate this", "ok"), ("what color", "red red")]
    full, t0 = S.build_prompt_ids(tok, "rate", pairs)
    cut, t1 = S.build_prompt_ids(tok, "rate", pairs, max_tokens=len(full) - 1)
    assert not t0 and t1
    assert tok.decode(cut, skip_special_tokens=True).split() == "rate Instruction: what color Response: red red The answer is:".split()
    assert S.build_prompt_ids(tok, "rate", pairs, max_tokens=3) == (None, True)


def test_injected_digit_logits_give_hand_scores(tok, monkeypatch):
    rng = np.random.default_rng(0)
    V = len(tok)
    table = {}  # prompt ids -> injected logits [V]

    def fake_logits(model, ids, mask):
        out = []
        for row, m in zip(ids, mask):
            key = tuple(row[: int(m.sum())].tolist())
            table.setdefault(key, torch.tensor(rng.normal(size=V) * 2, dtype=torch.float32))
            out.append(table[key])
        return torch.stack(out)

    monkeypatch.setattr(S, "last_position_logits", fake_logits)
    out = S.selectit_score_rows(None, tok, ROWS, prompts=PROMPTS, batch_size=2)
    for i, conv in enumerate(ROWS):
        s_tok = []
        for p in PROMPTS:
            ids, _ = S.build_prompt_ids(tok, p, S.conversation_pairs(conv))
            logits = table[tuple(ids)].double()
            probs = torch.softmax(logits, -1)[[3, 4, 5, 6, 7]].tolist()
            s_tok.append(_naive_s_tok(probs))
        mean = sum(s_tok) / len(s_tok)
        std = (sum((x - mean) ** 2 for x in s_tok) / len(s_tok)) ** 0.5
        assert out["s_sent"][i] == pytest.approx(mean / (1 + 0.2 * std), rel=1e-9)


def test_real_model_last_logits_and_failing_row(tok, model, monkeypatch):
    clean = S.selectit_score_rows(model, tok, ROWS, prompts=PROMPTS, batch_size=8)
    # hand: unpadded single forward, logits at the last position
    ids, _ = S.build_prompt_ids(tok, PROMPTS[0], S.conversation_pairs(ROWS[0]))
    with torch.no_grad():
        last = model(torch.tensor([ids])).logits[0, -1]
    want = _naive_s_tok(torch.softmax(last.double(), -1)[[3, 4, 5, 6, 7]].tolist())
    assert clean["s_tok"][0, 0] == pytest.approx(want, abs=1e-6)

    boom = tok.convert_tokens_to_ids("BOOM")
    real = S.last_position_logits

    def flaky(m, ids, mask):
        if (ids == boom).any():
            raise RuntimeError("injected failure")
        return real(m, ids, mask)

    monkeypatch.setattr(S, "last_position_logits", flaky)
    rows = ROWS[:2] + [_conv("BOOM", "blue")] + ROWS[2:] + [[{"role": "user", "content": "no answer"}]]
    out = S.selectit_score_rows(model, tok, rows, prompts=PROMPTS, batch_size=8)
    assert list(out["status"]) == ["ok", "ok", "error", "ok", "bad_messages"]
    assert np.isnan(out["s_sent"][[2, 4]]).all()
    np.testing.assert_allclose(out["s_sent"][[0, 1, 3]], clean["s_sent"], atol=1e-6)
