"""LM-based per-row scores: length, CE / PPL / entropy of the answer, and IFD.

Conventions (spec `data_selection.md` §2 "LM scorer conventions"):

* Template: LLaMA-Factory ``default`` (``Human: …\\nAssistant:``).
* Q (all turns before the last assistant turn) and A (the last assistant turn) are
  tokenised separately and concatenated, so every pass scores the same answer ids.
* ``max_len`` (4096) truncation cuts A at its tail; no room for a single answer token
  gives status ``prompt_too_long`` and null scores (the paper's script writes 0).
* Batches are length-sorted and right-padded; log-probs are computed in fp32 over chunks
  of answer positions only, so the full [T, V] fp32 logits never exist.
* CE uses the logits at t−1 for the token at t (the paper's script omits the shift).

IFD (Cherry_LLM, Li et al. 2024, Eq. 4): IFD = s(A|Q) / s(A), where s(A) is the mean
NLL of the same answer ids after only a short header ("Assistant: ").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from effsft.models.parts import decoder_and_head, head_logits_fp32

__all__ = [
    "STATUS_OK",
    "STATUS_PROMPT_TOO_LONG",
    "STATUS_BAD_MESSAGES",
    "split_prompt_answer",
    "render_default_template",
    "EncodedRow",
    "encode_pair",
    "length_scores",
    "length_sorted_batches",
    "pad_right",
    "last_hidden",
    "answer_token_stats",
    "ifd_ratio",
    "lm_score_rows",
]

STATUS_OK = "ok"
STATUS_PROMPT_TOO_LONG = "prompt_too_long"
STATUS_BAD_MESSAGES = "bad_messages"
DEFAULT_IFD_HEADER = "Assistant: "

Message = Mapping[str, str]


# ----------------------------------------------------------------------------- template
def split_prompt_answer(messages: Sequence[Message]) -> tuple[list[Message], str]:
    """Split canonical messages into Q (turns before the last assistant turn) and A.

    Args:
        messages: list of ``{"role": ..., "content": ...}``.

    Returns:
        ``(prior_turns, answer_text)``.

    Raises:
        ValueError: no assistant turn.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("messages have no assistant turn")
    return list(messages[:last]), messages[last]["content"]


def render_default_template(messages: Sequence[Message]) -> tuple[str, str]:
    """Render LLaMA-Factory's ``default`` template as (Q text, A text).

    LLaMA-Factory ``default``: system ``"{c}\\n"``, user ``"Human: {c}\\nAssistant:"``,
    assistant ``"{c}"``, and the separator ``"\\n"`` after every earlier assistant turn.
    The EOS that LLaMA-Factory appends to assistant turns is a special token; scoring uses
    no special tokens inside the text, so earlier turns end with the separator only.

    Args:
        messages: canonical messages (roles system/user/assistant).

    Returns:
        ``(q_text, a_text)``; the answer is the last assistant turn's content.
    """
    prior, answer = split_prompt_answer(messages)
    parts = []
    for m in prior:
        role, content = m["role"], m["content"]
        if role == "system":
            parts.append(f"{content}\n")
        elif role == "user":
            parts.append(f"Human: {content}\nAssistant:")
        elif role == "assistant":
            parts.append(f"{content}\n")
        else:
            raise ValueError(f"unsupported role {role!r}")
    return "".join(parts), answer


Template = Callable[[Sequence[Message]], tuple[str, str]]


# ----------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class EncodedRow:
    """Token ids of one row. ``answer_ids`` is already cut to fit ``max_len``."""

    prompt_ids: list[int]
    answer_ids: list[int]
    status: str
    answer_truncated: bool = False


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer, add_bos: bool) -> list[int]:
    return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []


def encode_pair(
    tokenizer,
    messages: Sequence[Message],
    max_len: int = 4096,
    add_bos: bool = True,
    template: Template = render_default_template,
) -> EncodedRow:
    """Tokenise Q and A separately; cut A at its tail so that |Q|+|A| ≤ max_len.

    Returns:
        EncodedRow with status ``ok``, ``prompt_too_long`` (no room for one answer token)
        or ``bad_messages`` (no assistant turn, unknown role, empty answer).
    """
    try:
        q_text, a_text = template(messages)
    except (ValueError, KeyError, TypeError):
        return EncodedRow([], [], STATUS_BAD_MESSAGES)
    prompt = _bos(tokenizer, add_bos) + _encode(tokenizer, q_text)
    answer = _encode(tokenizer, a_text)
    if not answer or not prompt:  # position 0 has no previous logits: Q must be non-empty
        return EncodedRow(prompt, [], STATUS_BAD_MESSAGES)
    room = max_len - len(prompt)
    if room < 1:
        return EncodedRow(prompt, [], STATUS_PROMPT_TOO_LONG)
    return EncodedRow(prompt, answer[:room], STATUS_OK, answer_truncated=len(answer) > room)


def length_scores(
    tokenizer, messages_list: Sequence[Sequence[Message]], template: Template = render_default_template
) -> dict[str, np.ndarray]:
    """Prompt / response / total token counts (no special tokens, no truncation).

    Every id counts, including id 0 (a real token in most BPE vocabularies; the paper's
    count of non-zero ids drops it). Rows the template rejects get -1.

    Returns:
        ``{"prompt_tokens", "response_tokens", "total_tokens"}``, each [N] int64.
    """
    q_texts, a_texts, ok = [], [], []
    for msgs in messages_list:
        try:
            q, a = template(msgs)
            ok.append(True)
        except (ValueError, KeyError, TypeError):
            q, a = "", ""
            ok.append(False)
        q_texts.append(q)
        a_texts.append(a)
    p, r = _batch_lengths(tokenizer, q_texts), _batch_lengths(tokenizer, a_texts)
    bad = ~np.asarray(ok, bool)
    p[bad], r[bad] = -1, -1
    total = np.where(bad, -1, p + r)
    return {"prompt_tokens": p, "response_tokens": r, "total_tokens": total}


def _batch_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Token counts of texts in one batched tokenizer call. Returns [N] int64."""
    if not texts:
        return np.zeros(0, np.int64)
    return np.array([len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]], np.int64)


# ----------------------------------------------------------------------------- batching
def length_sorted_batches(
    lengths: Sequence[int], batch_size: int = 8, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Group row indices into batches of similar length, longest first.

    Longest first so an out-of-memory error shows up in the first batch. A batch closes
    at ``batch_size`` rows or when its padded size (rows × longest) would pass
    ``max_tokens``.

    Returns:
        list of int64 index arrays covering every row once.
    """
    lengths = np.asarray(lengths, np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # stable: longest first
    batches, cur = [], []
    for i in order:
        too_many = len(cur) >= batch_size
        too_big = max_tokens is not None and cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens
        if cur and (too_many or too_big):
            batches.append(np.array(cur, np.int64))
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(np.array(cur, np.int64))
    return batches


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


@torch.inference_mode()
def answer_token_stats(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sums of −log p(a_t | ·) and of H(p(· | ·)) over the answer positions.

    The token at position t is predicted from the logits at t−1. Only the hidden states of
    the predicting positions go through lm_head, ``chunk_size`` rows at a time, in fp32.

    Args:
        model: HF causal LM.
        input_ids: [B, T] right-padded ids.
        attention_mask: [B, T].
        target_mask: [B, T] bool, True where the token is an answer token to score
            (never position 0).
        chunk_size: answer positions per lm_head call.

    Returns:
        ``(nll_sum [B], entropy_sum [B], n_tokens [B])`` as fp64 / fp64 / int64 on CPU.
    """
    body, head = decoder_and_head(model, plain_head=False)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    b_idx, t_idx = torch.nonzero(target_mask[:, 1:].to(device), as_tuple=True)  # t_idx = t−1
    targets = input_ids[b_idx, t_idx + 1]  # [M]
    B = input_ids.shape[0]
    nll_sum = torch.zeros(B, dtype=torch.float64, device=device)
    ent_sum = torch.zeros(B, dtype=torch.float64, device=device)
    for s in range(0, len(b_idx), chunk_size):
        sl = slice(s, s + chunk_size)
        logp = torch.log_softmax(head_logits_fp32(model, head, hidden[b_idx[sl], t_idx[sl]]), -1)  # [m, V]
        nll = -logp.gather(1, targets[sl, None]).squeeze(1)  # [m]
        ent = -(logp.exp() * logp).sum(-1)  # [m]
        nll_sum.index_add_(0, b_idx[sl], nll.double())
        ent_sum.index_add_(0, b_idx[sl], ent.double())
    n = torch.bincount(b_idx, minlength=B)
    return nll_sum.cpu(), ent_sum.cpu(), n.cpu()


def _mean_nll_batched(
    model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
    max_tokens: int | None, chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean answer NLL / entropy / count for (prefix_ids, answer_ids) pairs, length-sorted."""
    n = len(pairs)
    ce, ent, cnt = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64)
    for idx in length_sorted_batches([len(p) + len(a) for p, a in pairs], batch_size, max_tokens):
        ids, mask = pad_right([pairs[i][0] + pairs[i][1] for i in idx], pad_id)
        target = torch.zeros_like(mask, dtype=torch.bool)
        for b, i in enumerate(idx):
            p, a = pairs[i]
            target[b, len(p): len(p) + len(a)] = True
        nll_s, ent_s, k = answer_token_stats(model, ids, mask, target, chunk_size)
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
    ifd_header: str = DEFAULT_IFD_HEADER,
    drop_gt1: bool = True,
    add_bos: bool = True,
    template: Template = render_default_template,
) -> dict[str, np.ndarray]:
    """CE, PPL, entropy (and IFD) for a batch of rows; what a scorer actor's map calls.

    Args:
        model: HF causal LM in eval mode (any device / dtype).
        tokenizer: its tokenizer.
        messages_list: N canonical conversations.
        max_len: token limit for Q+A (A is cut at its tail).
        batch_size / max_tokens: length-sorted batching limits.
        chunk_size: answer positions per fp32 lm_head chunk.
        compute_ifd: also run the header-only pass for s(A) and IFD.
        ifd_header: text placed before A for s(A).
        drop_gt1: IFD ≥ 1 becomes null in ``ifd`` (``ifd_raw`` keeps it).
        add_bos: prepend the tokenizer's BOS (if it has one) to both passes.
        template: messages -> (Q text, A text).

    Returns:
        Columns, each [N]: ``ce``, ``ppl``, ``entropy`` (fp64, NaN = null),
        ``n_tokens`` (scored answer tokens), ``answer_truncated`` (bool),
        ``status`` (object str) and, with IFD, ``s_a``, ``ifd_raw``, ``ifd``.
    """
    rows = [encode_pair(tokenizer, m, max_len, add_bos, template) for m in messages_list]
    ok = np.array([r.status == STATUS_OK for r in rows], bool)
    okx = np.flatnonzero(ok)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(rows)
    out = {k: np.full(n, np.nan) for k in ("ce", "entropy")}
    out["n_tokens"] = np.zeros(n, np.int64)
    if len(okx):
        ce, ent, cnt = _mean_nll_batched(
            model, [(rows[i].prompt_ids, rows[i].answer_ids) for i in okx], pad_id, batch_size, max_tokens, chunk_size
        )
        out["ce"][okx], out["entropy"][okx], out["n_tokens"][okx] = ce, ent, cnt
    out["ppl"] = np.exp(out["ce"])
    out["answer_truncated"] = np.array([r.answer_truncated for r in rows], bool)
    out["status"] = np.array([r.status for r in rows], dtype=object)
    if compute_ifd:
        header = _bos(tokenizer, add_bos) + _encode(tokenizer, ifd_header)
        s_a = np.full(n, np.nan)
        if len(okx):
            # Same answer ids as the s(A|Q) pass; cut again only if the header needs room.
            pairs = [(header, rows[i].answer_ids[: max_len - len(header)]) for i in okx]
            s_a[okx] = _mean_nll_batched(model, pairs, pad_id, batch_size, max_tokens, chunk_size)[0]
        out["s_a"] = s_a
        out["ifd_raw"] = ifd_ratio(out["ce"], s_a, drop_gt1=False)
        out["ifd"] = ifd_ratio(out["ce"], s_a, drop_gt1=drop_gt1)
    return out
