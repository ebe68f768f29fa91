"""LM-based per-row scores: length, CE / PPL / entropy of the answer, and IFD.

Conventions:

* Template: the job's one rule (``model.template``, :mod:`effsft.corpus.tokenize`): rows are
  encoded exactly as SFT trains on them and eval scores them, so Q = the tokens before the last
  assistant turn, A = the tokens SFT labels in that turn (its content plus the template's
  end-of-turn tokens). A row SFT would drop (the final response does not fit ``max_len``;
  the earliest prompt tokens are cut first) gets status ``too_long`` and null scores.
* Batches are length-sorted and right-padded; log-probs are computed in fp32 over chunks
  of answer positions only, so the full [T, V] fp32 logits never exist.
* CE uses the logits at t−1 for the token at t (the paper's script omits the shift).

IFD (Cherry_LLM, Li et al. 2024, Eq. 4): IFD = s(A|Q) / s(A), where s(A) is the mean NLL of the
same answer ids after the template's generation prompt for an empty user turn (the prompt
without its content: :func:`effsft.corpus.tokenize.empty_prompt_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from effsft.corpus.tokenize import IGNORE_INDEX, empty_prompt_ids, encode_chats
from effsft.models.packing import length_sorted_batches
from effsft.models.parts import decoder_and_head

__all__ = [
    "STATUS_OK",
    "STATUS_TOO_LONG",
    "STATUS_BAD_MESSAGES",
    "EncodedRow",
    "encode_pairs",
    "encode_pair",
    "length_scores",
    "length_sorted_batches",
    "pad_right",
    "last_hidden",
    "ifd_ratio",
    "lm_score_rows",
]

STATUS_OK = "ok"
STATUS_TOO_LONG = "too_long"
STATUS_BAD_MESSAGES = "bad_messages"

Message = Mapping[str, str]


# ----------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class EncodedRow:
    """Token ids of one row: Q (``prompt_ids``) and A (``answer_ids``, the labelled tokens)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    status: str


def _through_last_answer(messages: Sequence[Message]) -> list[Message] | None:
    """The turns up to and including the last assistant turn; None if it is missing or empty."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or not str(messages[last].get("content") or "").strip():
        return None
    return list(messages[: last + 1])


def encode_pairs(tokenizer, messages_list: Sequence[Sequence[Message]], max_len: int = 4096) -> list[EncodedRow]:
    """Q and A ids of each row by the template rule (``encode_chat(train_on="last")``).

    Returns:
        One EncodedRow per row, status ``ok``, ``too_long`` (SFT would drop it too) or
        ``bad_messages`` (no assistant turn, an empty answer, nothing before the answer).
    """
    convs = [_through_last_answer(m) for m in messages_list]
    good = [i for i, c in enumerate(convs) if c is not None]
    out = [EncodedRow([], [], STATUS_BAD_MESSAGES)] * len(convs)
    for i, e in zip(good, encode_chats(tokenizer, [convs[i] for i in good], max_len, train_on="last")):
        prompt, answer = e.input_ids[: e.n_prompt], e.input_ids[e.n_prompt:]
        if e.too_long:
            out[i] = EncodedRow([], [], STATUS_TOO_LONG)
        elif not prompt or not answer:  # position 0 has no previous logits: Q must be non-empty
            out[i] = EncodedRow(prompt, answer, STATUS_BAD_MESSAGES)
        else:
            out[i] = EncodedRow(prompt, answer, STATUS_OK)
    return out


def encode_pair(tokenizer, messages: Sequence[Message], max_len: int = 4096) -> EncodedRow:
    """:func:`encode_pairs` for one row."""
    return encode_pairs(tokenizer, [messages], max_len)[0]


def length_scores(tokenizer, messages_list: Sequence[Sequence[Message]]) -> dict[str, np.ndarray]:
    """Prompt / response / total token counts under the template (no truncation).

    The prompt count includes the template's scaffolding: these are the tokens the model reads.
    Every id counts, including id 0 (a real token in most BPE vocabularies; the paper's count of
    non-zero ids drops it). Rows that cannot be encoded get -1.

    Returns:
        ``{"prompt_tokens", "response_tokens", "total_tokens"}``, each [N] int64.
    """
    rows = encode_pairs(tokenizer, messages_list, max_len=1 << 62)
    ok = np.array([r.status == STATUS_OK for r in rows], bool)
    p = np.where(ok, [len(r.prompt_ids) for r in rows], -1).astype(np.int64)
    r = np.where(ok, [len(r.answer_ids) for r in rows], -1).astype(np.int64)
    return {"prompt_tokens": p, "response_tokens": r, "total_tokens": np.where(ok, p + r, -1)}


# ----------------------------------------------------------------------------- batching
def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists.

    Returns:
        ``(input_ids [B, T] long, attention_mask [B, T] long)``.
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- forward
@torch.inference_mode()
def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-layer hidden states (after the final norm). [B, T] -> [B, T, H]."""
    body, _ = decoder_and_head(model, plain_head=False)
    return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _mean_nll_batched(
    model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
    max_tokens: int | None, chunk_size: int, packing: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean answer NLL / entropy / count for (prefix_ids, answer_ids) pairs.

    Length-sorted padded batches of ``batch_size`` rows (at most ``max_tokens`` padded tokens),
    or with ``packing`` padding-free packs (:mod:`effsft.models.packing`) as long as the
    longest row, as many per forward as ``batch_size`` rows fill on average: the same scores.
    """
    from effsft.models.nll import row_token_stats
    from effsft.models.packing import batches

    n = len(pairs)
    ce, ent, cnt = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64)
    rows = [(list(p) + list(a), [IGNORE_INDEX] * len(p) + list(a)) for p, a in pairs]
    for idx, batch in batches(rows, pad_id, batch_size, max_tokens, packing):
        nll_s, ent_s, k = row_token_stats(model, batch, len(idx), chunk_size)
        ce[idx] = (nll_s / k).numpy()
        ent[idx] = (ent_s / k).numpy()
        cnt[idx] = k.numpy()
    return ce, ent, cnt


def ifd_ratio(s_aq: np.ndarray, s_a: np.ndarray, drop_gt1: bool = True) -> np.ndarray:
    """IFD = s(A|Q) / s(A) (Cherry_LLM Eq. 4); NaN where s(A) ≤ 0 or either is null.

    Args:
        s_aq: [N] mean answer NLL given the prompt (= CE).
        s_a: [N] mean NLL of the same ids after only the header.
        drop_gt1: make IFD ≥ 1 ineligible (NaN): the prompt did not help at all.
    """
    s_aq, s_a = np.asarray(s_aq, np.float64), np.asarray(s_a, np.float64)
    valid = np.isfinite(s_aq) & np.isfinite(s_a) & (s_a > 0)
    out = np.full(s_aq.shape, np.nan)
    out[valid] = s_aq[valid] / s_a[valid]
    if drop_gt1:
        out[out >= 1] = np.nan
    return out


def lm_score_rows(
    model,
    tokenizer,
    messages_list: Sequence[Sequence[Message]],
    *,
    max_len: int = 4096,
    batch_size: int = 8,
    max_tokens: int | None = None,
    chunk_size: int = 1024,
    compute_ifd: bool = True,
    drop_gt1: bool = True,
    packing: bool = False,
) -> dict[str, np.ndarray]:
    """CE, PPL, entropy (and IFD) for a batch of rows; what a scorer actor's map calls.

    Args:
        model: HF causal LM in eval mode (any device / dtype).
        tokenizer: its tokenizer, with the job's template installed (``load_tokenizer``).
        messages_list: N canonical conversations.
        max_len: token limit of a row (as ``tokenize.max_len`` in SFT).
        batch_size / max_tokens: length-sorted batching limits.
        chunk_size: answer positions per fp32 lm_head chunk.
        compute_ifd: also run the unconditioned pass for s(A) and IFD.
        drop_gt1: IFD ≥ 1 becomes null in ``ifd`` (``ifd_raw`` keeps it).
        packing: score padding-free packed batches instead of padded ones (same scores).

    Returns:
        Columns, each [N]: ``ce``, ``ppl``, ``entropy`` (fp64, NaN = null),
        ``n_tokens`` (scored answer tokens), ``status`` (object str) and, with IFD, ``s_a``,
        ``ifd_raw``, ``ifd``.
    """
    rows = encode_pairs(tokenizer, messages_list, max_len)
    ok = np.array([r.status == STATUS_OK for r in rows], bool)
    okx = np.flatnonzero(ok)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(rows)
    out = {k: np.full(n, np.nan) for k in ("ce", "entropy")}
    out["n_tokens"] = np.zeros(n, np.int64)
    if len(okx):
        ce, ent, cnt = _mean_nll_batched(
            model, [(rows[i].prompt_ids, rows[i].answer_ids) for i in okx], pad_id, batch_size, max_tokens, chunk_size,
            packing)
        out["ce"][okx], out["entropy"][okx], out["n_tokens"][okx] = ce, ent, cnt
    out["ppl"] = np.exp(out["ce"])
    out["status"] = np.array([r.status for r in rows], dtype=object)
    if compute_ifd:
        header = empty_prompt_ids(tokenizer)
        s_a = np.full(n, np.nan)
        if len(okx):
            # The same answer ids as the s(A|Q) pass (cut only if the header leaves no room).
            pairs = [(header, rows[i].answer_ids[: max(1, max_len - len(header))]) for i in okx]
            s_a[okx] = _mean_nll_batched(model, pairs, pad_id, batch_size, max_tokens, chunk_size, packing)[0]
        out["s_a"] = s_a
        out["ifd_raw"] = ifd_ratio(out["ce"], s_a, drop_gt1=False)
        out["ifd"] = ifd_ratio(out["ce"], s_a, drop_gt1=drop_gt1)
    return out
