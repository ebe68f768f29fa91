"""Calibration and evaluation windows of ``effsft prune``: corpus documents rendered and
tokenised, calibration windows sampled like Wanda/DLP's C4 loader, held-out perplexity windows."""
from __future__ import annotations

import logging
import random
from typing import Sequence

import torch

from effsft.config import ConfigError, CorpusSpec
from effsft.prune.config import PruneConfig

log = logging.getLogger("effsft.prune")


def read_conversations(spec: CorpusSpec, limit: int, unreadable: list | None = None) -> list[list[dict]]:
    """First ``limit`` good conversations of any corpus, through the normalising readers;
    files found unreadable on the way are appended to ``unreadable`` (for the manifest)."""
    from effsft.corpus.prepare import first_good_rows

    rows, bad = first_good_rows(spec, limit)
    if bad:
        log.warning("prune: unreadable files in %s (skipped, listed in the manifest): %s", spec.path,
                    [u["file"] for u in bad])
    if unreadable is not None:
        unreadable += bad
    return [r["messages"] for r in rows]


def tokenize_documents(tokenizer, conversations: list[list[dict]], how: str = "chat") -> list[list[int]]:
    """Token ids per document: the conversation rendered with the model's chat template
    (``chat``), or its turns' contents joined by blank lines (``plain``)."""
    from effsft.corpus.tokenize import render

    texts = [render(tokenizer, m) if how == "chat" else "\n\n".join(t["content"] for t in m)
             for m in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def make_windows(token_ids: torch.Tensor | Sequence[int], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into non-overlapping ``[W, seqlen]`` windows (tail dropped)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"stream of {ids.numel()} tokens is shorter than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)



def calib_seqlen(config, seqlen: int) -> int:
    """``T = min(seqlen, max_position_embeddings)``."""
    cap = getattr(config, "max_position_embeddings", None)
    return min(seqlen, cap) if cap else seqlen


def sample_calibration_with_info(docs: Sequence[Sequence[int]], n_samples: int, seqlen: int, seed: int,
                                 eos_id: int | None) -> tuple[torch.Tensor, dict]:
    """Draw ``n_samples`` windows of ``seqlen`` tokens (Wanda/DLP's C4 recipe).

    Default: pick a random document longer than ``seqlen`` (with replacement) and cut it at
    a random offset. If no document is long enough, documents are shuffled, joined with
    ``eos_id`` and windows are cut at random offsets of the joined stream; this deviation is
    logged and reported in ``info``.

    Returns:
        ``(ids [n_samples, seqlen] long, info)``.
    """
    rng = random.Random(seed)
    long_docs = [d for d in docs if len(d) > seqlen]
    if long_docs:
        rows = []
        for _ in range(n_samples):
            doc = long_docs[rng.randrange(len(long_docs))]
            start = rng.randrange(len(doc) - seqlen)  # same range as the public loader
            rows.append(list(doc[start : start + seqlen]))
        return torch.tensor(rows, dtype=torch.long), {"mode": "long_documents", "n_long_documents": len(long_docs)}

    order = list(range(len(docs)))
    rng.shuffle(order)
    stream: list[int] = []
    for i in order:
        stream.extend(int(t) for t in docs[i])
        if eos_id is not None:
            stream.append(int(eos_id))
    if not stream:
        raise ValueError("no calibration tokens")
    repeats = 1
    while len(stream) * repeats <= seqlen:
        repeats += 1
    stream = stream * repeats
    msg = (f"calibration: no document longer than {seqlen} tokens; concatenating {len(docs)} documents "
           f"with EOS ({len(stream)} tokens, repeated x{repeats})")
    log.warning(msg)
    rows = []
    for _ in range(n_samples):
        start = rng.randrange(len(stream) - seqlen)
        rows.append(stream[start : start + seqlen])
    return torch.tensor(rows, dtype=torch.long), {"mode": "concatenated", "deviation": msg, "repeats": repeats}


def sample_calibration(docs: Sequence[Sequence[int]], n_samples: int, seqlen: int, seed: int,
                       eos_id: int | None) -> torch.Tensor:
    """``[n_samples, seqlen]`` calibration windows; see :func:`sample_calibration_with_info`."""
    return sample_calibration_with_info(docs, n_samples, seqlen, seed, eos_id)[0]


def build_windows(cfg: PruneConfig, tokenizer, max_positions: int | None):
    """Calibration windows ``[N, T]``, evaluation windows ``[W, T]`` and a data summary."""
    c, e = cfg.prune.calib, cfg.prune.eval
    T = min(c.seqlen, max_positions) if max_positions else c.seqlen
    unreadable: list = []
    if e.data is None:  # held out: the documents after the calibration ones
        convs = read_conversations(c.data, c.max_docs + e.max_docs, unreadable)
        calib_convs, eval_convs = convs[: c.max_docs], convs[c.max_docs:]
        if not eval_convs:
            raise ConfigError(f"prune.eval.data: not set, and {c.data.path} has no documents beyond the "
                              f"{len(calib_convs)} read for calibration (lower prune.calib.max_docs)")
    else:
        calib_convs = read_conversations(c.data, c.max_docs, unreadable)
        eval_convs = read_conversations(e.data, e.max_docs, unreadable)
    if not calib_convs:
        raise ConfigError(f"prune.calib.data: no usable conversations in {c.data.path}")
    calib_docs = tokenize_documents(tokenizer, calib_convs, cfg.prune.render)
    calib, info = sample_calibration_with_info(calib_docs, c.n_samples, T, c.seed, tokenizer.eos_token_id)
    stream = [t for doc in tokenize_documents(tokenizer, eval_convs, cfg.prune.render) for t in doc]  # joined documents
    if len(stream) < T:
        raise ConfigError(f"prune.eval: {len(stream)} held-out tokens, fewer than one window of {T}")
    windows = make_windows(torch.tensor(stream), T, e.n_windows)
    summary = {"seqlen": T, "calib_docs": len(calib_docs), "calib_tokens": sum(map(len, calib_docs)),
               "calib_mode": info["mode"], "calib_deviation": info.get("deviation"),
               "eval_docs": len(eval_convs), "eval_tokens": len(stream), "eval_windows": int(windows.shape[0]),
               "unreadable_files": unreadable}
    return calib, windows, summary
