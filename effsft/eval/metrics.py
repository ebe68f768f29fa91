"""Evaluation metrics on a model: response perplexity and exact-match accuracy.

Pure torch (no Ray): the eval recipe runs these inside a Ray task or actor.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from effsft.corpus.answer import AnswerRule
from effsft.corpus.tokenize import encode_chat, encode_prompt, prompt_turns


def perplexity(model, tokenizer, conversations: Sequence[Sequence[dict]], max_len: int = 512,
               batch_size: int = 8, progress: bool = False, packing: bool = False) -> dict:
    """exp(total response NLL / total response tokens) over the conversations.

    The response tokens are those SFT trains on (:func:`effsft.corpus.tokenize.encode_chat`),
    scored by :func:`effsft.models.nll.row_token_stats` in length-sorted padded batches or, with
    ``packing``, padding-free packs (the same numbers). Conversations whose response does not
    fit ``max_len`` are counted as ``too_long``.
    """
    from tqdm import tqdm

    from effsft.models.nll import row_token_stats
    from effsft.models.packing import batches

    enc = [encode_chat(tokenizer, m, max_len) for m in conversations]
    kept = [(e.input_ids, e.labels) for e in enc if not e.too_long and e.n_response > 0]
    total, n = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for idx, batch in tqdm(list(batches(kept, pad, batch_size, packing=packing)), desc="perplexity",
                           disable=not progress):
        s, _, k = row_token_stats(model, batch, len(idx), with_entropy=False)
        total, n = total + float(s.sum()), n + int(k.sum())
    mean = total / max(1, n)
    return {"ppl": math.exp(mean) if n else float("nan"), "mean_nll": mean, "tokens": n,
            "rows": len(kept), "too_long": len(enc) - len(kept)}


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[dict]], max_new_tokens: int = 64,
                    batch_size: int = 16, progress: bool = False) -> list[str]:
    """Batched greedy decoding (left padding); returns the decoded new text per prompt."""
    from tqdm import tqdm

    from effsft.models.loading import stop_token_ids

    dev = next(model.parameters()).device
    eos = stop_token_ids(model, tokenizer)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for s in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[s:s + batch_size]
        T = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), T), tokenizer.pad_token_id, dtype=torch.long)
        m = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, T - len(ids[i]):] = torch.tensor(ids[i])
            m[r, T - len(ids[i]):] = 1
        gen = model.generate(input_ids=x.to(dev), attention_mask=m.to(dev), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos)
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[r, T:], skip_special_tokens=True)
    return out


def rule_name(rule: AnswerRule) -> str:
    """A short label of a rule for reports (``last_number``, ``regex:<pattern>``)."""
    return f"regex:{rule.pattern}" if rule.format == "regex" else rule.format


def _accuracy(rule: AnswerRule, rows: Sequence[dict], gens: Sequence[str]) -> tuple[list[int], dict]:
    hits = [int(rule.match(g, str(r["answer"]))) for r, g in zip(rows, gens)]
    per_task: dict[str, list[int]] = {}
    for r, ok in zip(rows, hits):
        per_task.setdefault(r.get("task") or "all", []).append(ok)
    return hits, {"accuracy": sum(hits) / max(1, len(rows)),
                  "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())}}


def exact_match(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 64,
                batch_size: int = 16, progress: bool = False, *,
                rule: AnswerRule | None = None, also: Sequence[AnswerRule] = ()) -> dict:
    """Accuracy of ``rule.match(generation, row['answer'])`` on eval rows.

    Each row has ``messages`` (the prompt is every turn before a trailing assistant turn),
    ``answer`` and optionally ``task``. ``rule`` defaults to ``AnswerRule()`` (the text after
    the last ``Answer:``); each rule in ``also`` is scored on the same generations (e.g. a
    chat model that never writes ``Answer:`` under ``last_number``) and reported under
    ``also[<rule name>]``. Returns overall and per-task accuracy plus samples.
    """
    rule = AnswerRule() if rule is None else rule
    prompts = [prompt_turns(r["messages"]) for r in rows]
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    hits, res = _accuracy(rule, rows, gens)
    samples = [{"prompt": p[-1]["content"][:200], "generation": g[:200], "extracted": rule.extract(g),
                "answer": r["answer"], "correct": bool(ok)}
               for r, p, g, ok in list(zip(rows, prompts, gens, hits))[:10]]
    return {**res, "n": len(rows), "rule": rule_name(rule), "samples": samples,
            "also": {rule_name(a): _accuracy(a, rows, gens)[1] for a in also}}
