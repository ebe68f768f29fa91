"""Length, CE / PPL / entropy and IFD against hand loops over a tiny seeded LLaMA."""

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from effsft.corpus.tokenize import encode_chat, render
from effsft.select import lm_scores as L

TEXTS = [
    "Human: what is two plus two?\nAssistant: four. It is 4!",
    "System line\nHuman: name a colour\nAssistant: blue, or maybe red!",
    "the quick brown fox jumps over the lazy dog 1 2 3 4 5",
]


@pytest.fixture(scope="module")
def tok():
    # Byte-level BPE trained offline; special tokens are appended after training so that
    # id 0 is an ordinary byte token ("!").
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(TEXTS * 20, trainer)
    t.add_special_tokens(["<pad>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).float().eval()


CONVS = [
    [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four. It is 4!"}],
    [
        {"role": "system", "content": "System line"},
        {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "another?"},
        {"role": "assistant", "content": "maybe red, or the lazy dog!"},
    ],
    [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "jumps over the quick brown dog 1 2 3"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y!"}],
]


def _hand_mean_nll(model, prefix, answer, shift=True):
    ids = torch.tensor([prefix + answer])
    with torch.no_grad():
        logits = model(ids).logits[0].double()  # [T, V], full forward, no chunking
    terms = []
    for t in range(len(prefix), len(prefix) + len(answer)):
        row = logits[t - 1] if shift else logits[t]
        terms.append(-torch.log_softmax(row, -1)[ids[0, t]].item())
    return sum(terms) / len(terms)


def _reference_pair(tok, conv):
    """Q / A ids the plain way: render with the chat template, A = what follows the
    generation prompt of the turns before the last answer."""
    full = tok(render(tok, conv), add_special_tokens=False)["input_ids"]
    prompt = tok(render(tok, conv[:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    return prompt, full[len(prompt):]


def test_pairs_follow_the_template_rule(tok):
    for conv in CONVS:
        enc = L.encode_pair(tok, conv)
        assert (enc.prompt_ids, enc.answer_ids) == _reference_pair(tok, conv)
        sft = encode_chat(tok, conv, 4096, train_on="last")  # the tokens SFT trains on
        assert enc.prompt_ids + enc.answer_ids == sft.input_ids
        assert enc.answer_ids == [y for y in sft.labels if y != -100]
    text = tok.decode(L.encode_pair(tok, CONVS[1]).answer_ids)
    assert text == "maybe red, or the lazy dog!</s>\n"  # the default template's end of turn
    for bad in ([{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "  "}]):
        assert L.encode_pair(tok, bad).status == L.STATUS_BAD_MESSAGES


def test_length_counts_id_zero(tok):
    assert tok.convert_tokens_to_ids("!") == 0
    out = L.length_scores(tok, CONVS)
    for i, conv in enumerate(CONVS):
        qi, ai = _reference_pair(tok, conv)
        assert out["prompt_tokens"][i] == len(qi) and out["response_tokens"][i] == len(ai)
        assert out["total_tokens"][i] == len(qi) + len(ai)
    assert 0 in _reference_pair(tok, CONVS[0])[1]


def test_ce_matches_hand_loop_and_not_unshifted(model, tok):
    out = L.lm_score_rows(model, tok, CONVS, batch_size=1, compute_ifd=False)
    for i, conv in enumerate(CONVS):
        enc = L.encode_pair(tok, conv)
        want = _hand_mean_nll(model, enc.prompt_ids, enc.answer_ids)
        assert out["ce"][i] == pytest.approx(want, abs=1e-5)
        assert out["n_tokens"][i] == len(enc.answer_ids)
        assert abs(out["ce"][i] - _hand_mean_nll(model, enc.prompt_ids, enc.answer_ids, shift=False)) > 1e-3
    np.testing.assert_allclose(out["ppl"], np.exp(out["ce"]), rtol=1e-12)


def test_padded_batch_equals_single_rows_and_chunking(model, tok):
    single = L.lm_score_rows(model, tok, CONVS, batch_size=1)
    batched = L.lm_score_rows(model, tok, CONVS, batch_size=4, chunk_size=3)
    for k in ("ce", "entropy", "s_a", "ifd_raw"):
        np.testing.assert_allclose(batched[k], single[k], atol=1e-5)


def test_uniform_logits_entropy_is_log_v(tok):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    torch.nn.init.zeros_(m.lm_head.weight)
    out = L.lm_score_rows(m, tok, CONVS[:2], compute_ifd=False)
    np.testing.assert_allclose(out["entropy"], math.log(len(tok)), rtol=1e-6)
    np.testing.assert_allclose(out["ce"], math.log(len(tok)), rtol=1e-6)


def test_ifd_is_ratio_of_hand_means(model, tok):
    out = L.lm_score_rows(model, tok, CONVS, drop_gt1=False)
    # s(A): the same answer ids after the template's prompt with an empty user turn
    header = tok(render(tok, [{"role": "user", "content": ""}], add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert tok.decode(header) == "Human: \nAssistant:\n"
    for i, conv in enumerate(CONVS):
        enc = L.encode_pair(tok, conv)
        s_aq = _hand_mean_nll(model, enc.prompt_ids, enc.answer_ids)
        s_a = _hand_mean_nll(model, header, enc.answer_ids)
        assert out["s_a"][i] == pytest.approx(s_a, abs=1e-5)
        assert out["ifd"][i] == pytest.approx(s_aq / s_a, rel=1e-5)


def test_ifd_drop_gt1_and_nonpositive():
    r = L.ifd_ratio([0.5, 2.0, 1.0, 1.0, np.nan], [1.0, 1.0, 1.0, 0.0, 1.0], drop_gt1=True)
    assert r[0] == 0.5 and np.isnan(r[1:]).all()
    r = L.ifd_ratio([0.5, 2.0, 1.0], [1.0, 1.0, -1.0], drop_gt1=False)
    assert list(r[:2]) == [0.5, 2.0] and np.isnan(r[2])


def test_truncation_is_sfts_rule(model, tok):
    conv = CONVS[1]
    full = L.encode_pair(tok, conv, max_len=4096)
    n = len(full.prompt_ids) + len(full.answer_ids)
    cut = L.encode_pair(tok, conv, max_len=n - 3)  # the earliest prompt tokens go, the answer stays
    assert cut.status == "ok" and cut.answer_ids == full.answer_ids and cut.prompt_ids == full.prompt_ids[3:]
    too_long = L.encode_pair(tok, conv, max_len=len(full.answer_ids) - 1)
    assert too_long.status == L.STATUS_TOO_LONG == "too_long"
    assert encode_chat(tok, conv, len(full.answer_ids) - 1, train_on="last").too_long  # SFT drops it too
    out = L.lm_score_rows(model, tok, [conv, CONVS[0]], max_len=len(full.answer_ids) - 1)
    assert out["status"][0] == L.STATUS_TOO_LONG and np.isnan(out["ce"][0]) and np.isnan(out["ifd"][0])


def test_length_sorted_batches_cover_all():
    lengths = [5, 50, 7, 50, 1, 30]
    batches = L.length_sorted_batches(lengths, batch_size=2)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    assert [lengths[i] for i in np.concatenate(batches)] == sorted(lengths, reverse=True)
    assert all(len(b) * max(lengths[i] for i in b) <= 60 for b in L.length_sorted_batches(lengths, 8, max_tokens=60))
