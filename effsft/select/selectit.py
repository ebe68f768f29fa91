"""SelectIT self-reflection scores (Liu et al. 2024, https://github.com/Blue-Raincoat/SelectIT).

The model is asked, with K rating prompts, to rate a (instruction, response) sample from
1 to L; the probabilities of the digit tokens "1".."L" at the answer position give

* token level   (SelectIT Eq. 2): P'_k = P_k / Σ_j P_j,  b = argmax_k P'_k,
                                 S_tok = b · Σ_k (P'_b − P'_k) / (L − 1);
* sentence level (Eq. 3):        S_sent = mean_K(S_tok) / (1 + α · std_K(S_tok)),
                                 α = 0.2, population std;
* model level   (Eq. 4):         S = Σ_n w_n · S_sent,n,  w_n = params_n / Σ params.

Fixes vs the reference (docs/algorithms/data_selection.md §2.1): digit ids come from the tokenizer and must be single
tokens; L and K are separate; model weights are normalised; prompts over the token limit
lose their *earliest* turn pairs (not the tail with the rated answer); a failing row is
nulled alone instead of silently shifting every later group.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from effsft.models.parts import decoder_and_head, head_logits_fp32
from effsft.select.lm_scores import length_sorted_batches, pad_right

__all__ = [
    "RATING_PROMPTS",
    "conversation_pairs",
    "build_prompt_ids",
    "resolve_digit_ids",
    "digit_probs",
    "token_level_score",
    "sentence_level_score",
    "model_level_score",
    "last_position_logits",
    "selectit_score_rows",
]

# effsft's own paraphrases (spec Appendix A): rate 1..5 how accurately the response follows
# the instruction, and state the score plainly. Users may replace them (config: prompts).
RATING_PROMPTS: tuple[str, ...] = (
    "Rate from 1 to 5 how accurately the response below follows the instruction and its input. "
    "Reply with the score alone on its own line.",
    "On a scale of 1 (poor) to 5 (excellent), judge how well the response answers the instruction "
    "and respects the given input. Give only the number on a separate line.",
    "Read the instruction and the response. How faithfully and correctly does the response carry out "
    "the instruction? Answer with one digit from 1 to 5 on its own line.",
    "You are a strict reviewer. Score the response's accuracy with respect to the instruction and input, "
    "using 1 for useless and 5 for perfect. State the score plainly on a new line.",
    "Evaluate whether the response fulfils what the instruction asks for. Output a single rating "
    "between 1 and 5 on its own line, where a higher number means a more accurate response.",
)

Message = Mapping[str, str]
STATUS_OK = "ok"
STATUS_BAD_MESSAGES = "bad_messages"
STATUS_TOO_LONG = "too_long"
STATUS_ERROR = "error"


# ----------------------------------------------------------------------------- prompts
def conversation_pairs(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(instruction, response) pairs up to the last assistant turn.

    Consecutive non-assistant turns (system, user) are joined with a newline into the
    instruction of the next assistant turn.

    Raises:
        ValueError: no assistant turn.
    """
    pairs, pending = [], []
    for m in messages:
        if m["role"] == "assistant":
            pairs.append(("\n".join(pending), m["content"]))
            pending = []
        else:
            pending.append(m["content"])
    if not pairs:
        raise ValueError("messages have no assistant turn")
    return pairs


ANSWER_LEAD = "The answer is: "


def prompt_text(tokenizer, rating_prompt: str, pairs: Sequence[tuple[str, str]]) -> str:
    """The rating request as a user turn of the job's template, the reply begun with
    ``"The answer is: "`` (so the next token is the digit).

    SelectIT's prompt is the rating line, ``\\nInstruction: q\\nResponse: a`` per pair and
    ``\\nThe answer is: ``; with a chat model the request belongs in the user turn and the lead
    in the model's own reply, rendered by the same template rule as every other job.
    """
    from effsft.corpus.tokenize import render

    body = "".join(f"\nInstruction: {q}\nResponse: {a}" for q, a in pairs)
    turn = [{"role": "user", "content": f"{rating_prompt}{body}"}]
    return render(tokenizer, turn, add_generation_prompt=True) + ANSWER_LEAD


def build_prompt_ids(
    tokenizer,
    rating_prompt: str,
    pairs: Sequence[tuple[str, str]],
    max_tokens: int = 8192,
) -> tuple[list[int] | None, bool]:
    """Token ids of the rating prompt; drops the earliest pairs above ``max_tokens``.

    Returns:
        ``(ids, truncated)``; ``ids`` is None if even the last pair alone is too long.
    """
    for start in range(len(pairs)):
        ids = tokenizer(prompt_text(tokenizer, rating_prompt, pairs[start:]), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return list(ids), start > 0
    return None, True


def resolve_digit_ids(tokenizer, n_levels: int = 5) -> list[int]:
    """Ids of the single tokens "1".."L" (the reference hard-codes 16–20 for LLaMA).

    Raises:
        ValueError: a digit is not exactly one token in this vocabulary.
    """
    out = []
    for k in range(1, n_levels + 1):
        ids = tokenizer(str(k), add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or tokenizer.decode(ids).strip() != str(k):
            raise ValueError(f"digit {k!r} is not a single token for this tokenizer (got ids {ids})")
        out.append(int(ids[0]))
    return out


# ----------------------------------------------------------------------------- scores
def digit_probs(last_logits: torch.Tensor, digit_ids: Sequence[int]) -> torch.Tensor:
    """P_k: full-vocabulary softmax probability of each digit token. [..., V] -> [..., L]."""
    return torch.softmax(last_logits.double(), -1)[..., list(digit_ids)]


def token_level_score(probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """S_tok = b · Σ_k (P'_b − P'_k)/(L−1) with P' = P/ΣP, b = argmax P' (1-based).

    Args:
        probs: [..., L] digit probabilities.

    Returns:
        [...] float64.
    """
    p = np.asarray(probs, dtype=np.float64)
    L = p.shape[-1]
    p = p / p.sum(-1, keepdims=True)
    b = p.argmax(-1)  # [...], 0-based
    p_b = np.take_along_axis(p, b[..., None], -1)  # [..., 1]
    return (b + 1) * (p_b - p).sum(-1) / (L - 1)


def sentence_level_score(s_tok: np.ndarray, alpha: float = 0.2) -> np.ndarray:
    """S_sent = mean_K(S_tok) / (1 + α·std_K(S_tok)) with the population std. [..., K] -> [...]."""
    s = np.asarray(s_tok, dtype=np.float64)
    return s.mean(-1) / (1.0 + alpha * s.std(-1, ddof=0))


def model_level_score(per_model: Sequence[np.ndarray], param_counts: Sequence[int]) -> np.ndarray:
    """S = Σ_n w_n·S_sent,n with w_n = params_n / Σ params; a null in any model nulls the row.

    Args:
        per_model: M arrays [N] of S_sent (per-row join already done).
        param_counts: M parameter counts.
    """
    w = np.asarray(param_counts, dtype=np.float64)
    w = w / w.sum()
    return np.tensordot(w, np.stack([np.asarray(s, np.float64) for s in per_model]), axes=1)


# ----------------------------------------------------------------------------- model
@torch.inference_mode()
def last_position_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real token only. [B, T] (right-padded) -> [B, V] fp32."""
    body, head = decoder_and_head(model, plain_head=False)
    device = next(model.parameters()).device
    hidden = body(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    last = attention_mask.sum(1).to(device) - 1  # [B]
    h = hidden[torch.arange(len(last), device=device), last]  # [B, H]
    return head_logits_fp32(model, head, h).cpu()


def _digit_probs_for(model, seqs: Sequence[list[int]], pad_id: int, digit_ids: Sequence[int]) -> np.ndarray:
    ids, mask = pad_right(seqs, pad_id)
    return digit_probs(last_position_logits(model, ids, mask), digit_ids).numpy()  # [b, L]


def selectit_score_rows(
    model,
    tokenizer,
    messages_list: Sequence[Sequence[Message]],
    *,
    prompts: Sequence[str] = RATING_PROMPTS,
    digit_ids: Sequence[int] | None = None,
    n_levels: int = 5,
    alpha: float = 0.2,
    max_tokens: int = 8192,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Sentence-level SelectIT score of each row for one model (K forwards per row).

    A batch that raises is retried row by row, so an error nulls only the rows that fail.

    Returns:
        ``s_sent`` [N] float64 (NaN = null), ``s_tok`` [N, K], ``truncated`` [N] bool,
        ``status`` [N] object (ok, bad_messages, too_long, error).
    """
    digit_ids = list(digit_ids) if digit_ids is not None else resolve_digit_ids(tokenizer, n_levels)
    N, K = len(messages_list), len(prompts)
    status = np.full(N, STATUS_OK, dtype=object)
    truncated = np.zeros(N, bool)
    seqs: list[tuple[int, int, list[int]]] = []  # (row, prompt k, ids)
    for i, msgs in enumerate(messages_list):
        try:
            pairs = conversation_pairs(msgs)
        except (ValueError, KeyError, TypeError):
            status[i] = STATUS_BAD_MESSAGES
            continue
        row = []
        for k, prompt in enumerate(prompts):
            ids, trunc = build_prompt_ids(tokenizer, prompt, pairs, max_tokens)
            if ids is None:
                status[i] = STATUS_TOO_LONG
                break
            truncated[i] |= trunc
            row.append((i, k, ids))
        else:
            seqs.extend(row)
    probs = np.full((N, K, len(digit_ids)), np.nan)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for idx in length_sorted_batches([len(s[2]) for s in seqs], batch_size):
        try:
            p = _digit_probs_for(model, [seqs[j][2] for j in idx], pad_id, digit_ids)
            for j, pj in zip(idx, p):
                probs[seqs[j][0], seqs[j][1]] = pj
        except Exception:  # noqa: BLE001 - isolate the failing row(s), keep the rest
            for j in idx:
                i, k, ids = seqs[j]
                try:
                    probs[i, k] = _digit_probs_for(model, [ids], pad_id, digit_ids)[0]
                except Exception:  # noqa: BLE001
                    status[i] = STATUS_ERROR
    s_tok = token_level_score(probs)  # [N, K]
    failed = status != STATUS_OK
    s_tok[failed] = np.nan
    s_sent = sentence_level_score(s_tok, alpha)
    return {"s_sent": s_sent, "s_tok": s_tok, "truncated": truncated, "status": status}
