"""Padding-free packing: several tokenised rows in one sequence, none split, none cross-attending.

Pure torch/numpy (no Ray). A packed micro-batch is ``[P, L]`` tensors whose rows are packs of
whole rows (segments); ``position_ids`` restart at 0 at every segment, and the model is called
with ``attention_mask=None``: transformers then derives the block-diagonal causal mask from the
position ids (SDPA / eager: ``masking_utils.find_packed_sequence_indices``) or, with
``flash_attention_2``, runs the varlen kernel on ``cu_seqlens`` built from them. So a token
attends to the earlier tokens of its own row only, at the positions it has unpacked, and its
logits, loss and gradient are those of the row run alone.

Labels: the first token of every segment is never a target (it has no earlier token of its own
row; unpacked, position 0 is never predicted either), so its label is -100 and the shifted
loss never scores a segment's first token from the previous segment's last one. The tail of a
pack is padding: a segment of its own (positions 0..k-1, labels -100), ``segment`` -1.

Plans (which rows share a pack) are deterministic functions of the row lengths:

* ``bfd`` (best-fit decreasing, the default): longest rows first, each into the fullest pack it
  still fits; the usual choice (TRL's ``packing="bfd"``, LLaMA-Factory's ``neat_packing``).
* ``greedy``: rows in their order, a new pack when the next one does not fit (keeps order).

A row longer than ``pack_len`` becomes a pack of its own (never split); :func:`plan_packs`
counts these as ``oversized``.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from effsft.corpus.tokenize import IGNORE_INDEX

Strategy = Literal["bfd", "greedy"]


@dataclass(frozen=True)
class PackPlan:
    """``packs[j]`` lists the row indices (into the planned rows) of pack ``j``."""

    packs: list[list[int]]
    pack_len: int
    oversized: int  # rows longer than pack_len, each alone in its pack


def plan_packs(lengths: Sequence[int], pack_len: int, strategy: Strategy = "bfd") -> PackPlan:
    """Assign rows to packs of at most ``pack_len`` tokens, no row split.

    Args:
        lengths: tokens per row.
        pack_len: capacity of a pack.
        strategy: ``bfd`` or ``greedy`` (see the module docstring).

    Returns:
        The plan; within a pack, rows keep their input order (stable, deterministic).
    """
    lengths = [int(x) for x in lengths]
    if pack_len < 1:
        raise ValueError(f"train.pack_len must be >= 1 (got {pack_len})")
    oversized = sum(n > pack_len for n in lengths)
    if strategy == "greedy":
        packs, cur, used = [], [], 0
        for i, n in enumerate(lengths):
            if cur and used + n > pack_len:
                packs.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            packs.append(cur)
        return PackPlan(packs, pack_len, oversized)
    if strategy != "bfd":
        raise ValueError(f"train.packing must be off, bfd or greedy (got {strategy!r})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    # Free space of every open pack, kept sorted as (space, pack index) for a best-fit search.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))   # the tightest pack with room for n
        if k < len(free):
            space, j = free.pop(k)
            packs[j].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, j))
        else:
            packs.append([i])
            if pack_len - n > 0:
                bisect.insort(free, (pack_len - n, len(packs) - 1))
    return PackPlan([sorted(p) for p in packs], pack_len, oversized)


def plan_stats(lengths: Sequence[int], plan: PackPlan, padded_batch: int) -> dict:
    """What a manifest records: packs, fill ratio, and the padding fraction of the tokens a
    step computes with padded batches of ``padded_batch`` rows (in row order) vs these packs."""
    lengths = np.asarray(lengths, np.int64)
    real = int(lengths.sum())
    padded = sum(int(lengths[s:s + padded_batch].max()) * len(lengths[s:s + padded_batch])
                 for s in range(0, len(lengths), padded_batch)) if len(lengths) else 0
    width = [max(plan.pack_len, int(lengths[p].sum())) for p in plan.packs]
    packed = int(sum(width))
    return {"rows": int(len(lengths)), "packs": len(plan.packs), "pack_len": plan.pack_len,
            "oversized_rows": plan.oversized, "fill_ratio": real / packed if packed else 0.0,
            "padding_fraction_before": 1 - real / padded if padded else 0.0,
            "padding_fraction_after": 1 - real / packed if packed else 0.0}


def pack_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], packs: Sequence[Sequence[int]],
              pad_id: int, width: int | None = None) -> dict:
    """Build a packed micro-batch.

    Args:
        rows: ``(input_ids, labels)`` per row.
        packs: row indices per pack (one tensor row each).
        pad_id: id of the padding tokens at the tail of a pack.
        width: the tensors' width L (default: the longest pack).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` ``[P, L]`` long; ``segment`` ``[P, L]`` long
        (index into ``rows`` of the row each token belongs to, -1 on padding);
        ``num_tokens`` / ``num_response_tokens`` (ints: real tokens, labelled targets).
    """
    sizes = [sum(len(rows[i][0]) for i in p) for p in packs]
    L = max(sizes + [width or 0, 1])
    P = len(packs)
    ids = torch.full((P, L), pad_id, dtype=torch.long)
    labels = torch.full((P, L), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((P, L), dtype=torch.long)
    seg = torch.full((P, L), -1, dtype=torch.long)
    n_resp = 0
    for r, pack in enumerate(packs):
        at = 0
        for i in pack:
            x, y = rows[i]
            n = len(x)
            ids[r, at:at + n] = torch.as_tensor(list(x), dtype=torch.long)
            y = torch.as_tensor(list(y), dtype=torch.long)
            y[0] = IGNORE_INDEX  # a segment's first token has no earlier token of its own row
            labels[r, at:at + n] = y
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = i
            n_resp += int((y != IGNORE_INDEX).sum())
            at += n
        pos[r, at:] = torch.arange(L - at)  # the tail: a padding segment of its own
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment": seg,
            "num_tokens": int(sum(sizes)), "num_response_tokens": n_resp}


def model_inputs(batch: dict) -> dict:
    """Keyword arguments of the model's forward for a padded or a packed batch.

    Packed batches (``position_ids`` present) go without an attention mask, so transformers
    builds the per-segment mask from the position ids; padded ones pass their mask. Always
    ``use_cache=False``: transformers looks for packed segments only when there is no KV cache,
    and an eval-mode model with ``config.use_cache`` (the default) makes one, so a packed forward
    without it lets every row attend to the rows before it in its pack.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None,
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def row_layout(segment: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's tokens sit in a packed batch, as a padded ``[B, T]`` view.

    Args:
        segment: ``[P, L]`` row index per token (-1 on padding), rows contiguous and in order
            within a pack.
        n_rows: B, the number of rows.

    Returns:
        ``(flat_index [B, T], valid [B, T])``: ``flat_index[b, t]`` is the position in
        ``segment.view(-1)`` of row b's token t (0 where ``valid`` is False); T is the longest row.
        ``x.view(P * L, ...)[flat_index]`` turns a packed ``[P, L, ...]`` tensor into the
        ``[B, T, ...]`` layout the per-row code (Q-Tuning's selection) expects.
    """
    flat = segment.reshape(-1)
    where = torch.nonzero(flat >= 0).squeeze(1)           # token positions, in packed order
    rows = flat[where]
    counts = torch.bincount(rows, minlength=n_rows)        # [B]
    T = int(counts.max()) if n_rows else 0
    order = torch.argsort(rows, stable=True)              # tokens grouped by row, in order
    where = where[order]
    starts = torch.cumsum(counts, 0) - counts              # [B]
    t = torch.arange(T, device=segment.device)
    valid = t[None, :] < counts[:, None]                   # [B, T]
    idx = (starts[:, None] + t[None, :]).clamp(max=max(0, len(where) - 1))
    flat_index = torch.where(valid, where[idx] if len(where) else torch.zeros_like(idx), torch.zeros_like(idx))
    return flat_index, valid


def to_rows(packed: torch.Tensor, flat_index: torch.Tensor, valid: torch.Tensor, fill=0) -> torch.Tensor:
    """``[P, L, ...]`` -> ``[B, T, ...]`` by :func:`row_layout`'s index (differentiable)."""
    P, L = packed.shape[:2]
    out = packed.reshape(P * L, *packed.shape[2:])[flat_index]
    mask = valid.view(*valid.shape, *([1] * (out.dim() - 2)))
    return torch.where(mask, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))


class RowBatch:
    """A micro-batch seen as rows, whether it is padded (``[B, T]`` with ``attention_mask``) or
    packed (``[P, L]`` with ``position_ids`` / ``segment``): the per-row code (Q-Tuning's
    selection and loss) works on :attr:`labels` / :attr:`attention_mask` ``[B, T]`` and on
    :meth:`hidden`, while the forward runs in the batch's own layout.
    """

    def __init__(self, batch: dict):
        self.batch = batch
        self.packed = "position_ids" in batch
        if self.packed:
            seg = batch["segment"]
            self.n_rows = int(seg.max()) + 1 if (seg >= 0).any() else 0
            self.index, valid = row_layout(seg, self.n_rows)
            self.labels = to_rows(batch["labels"], self.index, valid, fill=IGNORE_INDEX)
            self.attention_mask = valid.long()
        else:
            self.labels, self.attention_mask = batch["labels"], batch["attention_mask"]
            self.n_rows = int(self.labels.shape[0])

    def hidden(self, decoder: torch.nn.Module) -> torch.Tensor:
        """Final hidden states of the rows, ``[B, T, H]`` (packed: computed packed, then laid out)."""
        h = decoder(**model_inputs(self.batch)).last_hidden_state
        return to_rows(h, self.index, self.attention_mask.bool()) if self.packed else h

    def subset(self, rows: torch.Tensor) -> "RowBatch":
        """The batch of ``rows`` only (two_pass's second pass): padded rows are cropped to their
        longest; packed rows are packed again (best fit), so dropping rows drops compute."""
        if not self.packed:
            am = self.attention_mask[rows]
            cols = am.bool().any(dim=0).nonzero()
            n = int(cols.max()) + 1 if cols.numel() else 1
            return RowBatch({"input_ids": self.batch["input_ids"][rows, :n], "attention_mask": am[:, :n],
                             "labels": self.labels[rows, :n]})
        ids = to_rows(self.batch["input_ids"], self.index, self.attention_mask.bool())
        lengths = self.attention_mask.sum(1)
        kept = [(ids[r, : lengths[r]].tolist(), self.labels[r, : lengths[r]].tolist()) for r in rows.tolist()]
        L = int(self.batch["input_ids"].shape[1])
        plan = plan_packs([len(x) for x, _ in kept], L, "bfd")
        out = pack_rows(kept, plan.packs, pad_id=0)  # pad ids carry no label: any id works
        dev = self.batch["input_ids"].device
        return RowBatch({k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in out.items()})

    def with_labels(self, labels_rows: torch.Tensor) -> "RowBatch":
        """The same batch with new row-layout labels ``[B, T]`` (e.g. a token mask applied)."""
        if not self.packed:
            return RowBatch({**self.batch, "labels": labels_rows})
        flat = self.batch["labels"].clone().view(-1)
        flat[self.index[self.attention_mask.bool()]] = labels_rows[self.attention_mask.bool()]
        return RowBatch({**self.batch, "labels": flat.view_as(self.batch["labels"])})


def batches(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, batch_size: int,
            max_tokens: int | None = None, packing: bool = False):
    """Scoring batches of ``(input_ids, labels)`` rows: ``(row indices [b], batch)`` covering
    every row once, for :func:`effsft.models.nll.row_token_stats`.

    Unpacked: length-sorted, right-padded batches of ``batch_size`` rows (at most
    ``max_tokens`` padded tokens). Packed: best-fit packs as long as the longest row, as many
    per batch as ``batch_size`` rows fill on average; a batch numbers its segments in the order
    of its indices.
    """
    lengths = [len(x) for x, _ in rows]
    if not rows:
        return
    if not packing:
        for idx in length_sorted_batches(lengths, batch_size, max_tokens):
            yield idx, _pad([rows[i] for i in idx], pad_id)
        return
    plan = plan_packs(lengths, max(lengths), "bfd")
    per = max(1, round(batch_size * len(plan.packs) / len(rows)))
    for s in range(0, len(plan.packs), per):
        group = plan.packs[s:s + per]
        idx = np.array([i for p in group for i in p], np.int64)
        local, at = [], 0
        for p in group:
            local.append(list(range(at, at + len(p))))
            at += len(p)
        yield idx, pack_rows([rows[i] for i in idx], local, pad_id)


def length_sorted_batches(lengths: Sequence[int], batch_size: int = 8, max_tokens: int | None = None) -> list[np.ndarray]:
    """Row indices in batches of similar length, longest first (an out-of-memory error shows
    in the first batch); a batch closes at ``batch_size`` rows or ``max_tokens`` padded tokens."""
    lengths = np.asarray(lengths, np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # stable: longest first
    out, cur = [], []
    for i in order:
        too_big = max_tokens is not None and cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens
        if cur and (len(cur) >= batch_size or too_big):
            out.append(np.array(cur, np.int64))
            cur = []
        cur.append(int(i))
    if cur:
        out.append(np.array(cur, np.int64))
    return out


def _pad(rows, pad_id: int) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]``."""
    T = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (x, y) in enumerate(rows):
        ids[b, :len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        labels[b, :len(y)] = torch.as_tensor(list(y), dtype=torch.long)
        mask[b, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
