"""The batch layout of the shared-prefix forward: whole prompt groups ``[P; R_1; ...; R_G]`` packed
into rows, with the flat indices and additive masks the grouped attention reads (pure tensor code)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


# ----------------------------------------------------------------------------------------------
# Plan: index bookkeeping for one micro-batch
# ----------------------------------------------------------------------------------------------
@dataclass
class GroupPlan:
    """Index plan of one packed micro-batch (built once, used by every layer).

    Group b is ``[P_b; R_b1; ...; R_bG]``, laid out in one of ``R`` right-padded rows of ``S``
    (several groups per row when they fit). All indices are flat indices into the ``R * S``
    packed positions; ``B`` below is the number of groups.

    Attributes:
        input_ids: ``[B, S]`` packed token ids (pad = 0).
        position_ids: ``[B, S]``; 0..Lp-1 over the prompt, restarting at Lp for every completion.
        prefix_gather: ``[B * maxLp]`` flat packed index of each prompt slot (pads point at the row start).
        prefix_valid: ``[B, maxLp]`` True where the prompt slot is a real token.
        suffix_gather: ``[N * maxLr]`` flat packed index of each completion slot.
        suffix_valid: ``[N, maxLr]`` True where the completion slot is a real token.
        row_of: ``[N]`` packed row (group) of each non-empty completion.
        scatter_src: ``[n_valid]`` indices into ``cat(prefix slots, suffix slots)`` of real tokens.
        scatter_dst: ``[n_valid]`` their flat packed positions.
        max_span: largest ``Lp + Lr`` of any completion (for the sliding-window check).
        pred_idx: ``[M]`` flat packed position whose logit predicts each completion token
            (M = total completion tokens, prompt-major).
        targets: ``[M]`` the completion tokens themselves.
        calls: number of attention layers that consumed this plan (tests check it).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    prefix_gather: torch.Tensor
    prefix_valid: torch.Tensor
    suffix_gather: torch.Tensor
    suffix_valid: torch.Tensor
    row_of: torch.Tensor
    scatter_src: torch.Tensor
    scatter_dst: torch.Tensor
    max_span: int
    pred_idx: torch.Tensor
    targets: torch.Tensor
    calls: int = 0
    _mask_cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def additive_masks(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive float masks (0 = visible, finfo.min = hidden) for the two attention calls.

        A finite minimum (not -inf) keeps padded query rows NaN-free; NaN there would leak into dK/dV.

        Returns:
            prefix mask ``[B, 1, maxLp, maxLp]`` (B groups; causal & valid key) and suffix mask
            ``[N, 1, maxLr, maxLp + maxLr]`` (all valid prefix keys, then causal & valid suffix keys;
            the bottom-right-aligned causal mask of query t over ``Lp + t + 1`` keys).
        """
        key = (dtype, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = tuple(
                torch.zeros(a.shape, dtype=dtype, device=device).masked_fill(~a.to(device), torch.finfo(dtype).min)
                for a in self._allowed()
            )
        return self._mask_cache[key]

    def _allowed(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, Lp = self.prefix_valid.shape
        N, Lr = self.suffix_valid.shape
        causal_p = torch.ones(Lp, Lp, dtype=torch.bool, device=self.prefix_valid.device).tril()  # [Lp, Lp]
        allowed_p = causal_p[None] & self.prefix_valid[:, None, :]  # [B, Lp, Lp]
        causal_s = torch.ones(Lr, Lr, dtype=torch.bool, device=self.suffix_valid.device).tril()  # [Lr, Lr]
        keys_p = self.prefix_valid[self.row_of][:, None, :].expand(N, Lr, Lp)  # [N, Lr, Lp]
        keys_s = causal_s[None] & self.suffix_valid[:, None, :]  # [N, Lr, Lr]
        allowed_s = torch.cat([keys_p, keys_s], dim=-1)  # [N, Lr, Lp + Lr]
        return allowed_p[:, None], allowed_s[:, None]


def build_plan(prompts: list[torch.Tensor], completions: list[list[torch.Tensor]],
               pack: bool = True) -> GroupPlan:
    """Lay whole groups ``[P; R_1; ...; R_G]`` out in rows, several groups per row when they fit.

    With ``pack`` the groups are packed best-fit into rows as long as the longest group (never a
    group split), so a micro-batch of many small groups pads little; without it every group has
    a row of its own. The layout only places tokens: every attention index below is a flat index
    into the ``R * S`` packed positions, and the grouped attention reads groups through them, so
    a group never sees another group of its row.

    Args:
        prompts: B 1-D LongTensors (unpadded, each of length >= 1).
        completions: per prompt, a list of 1-D LongTensors; empty ones must already be dropped, and
            each group must hold at least one completion.
        pack: several groups per row (best fit); False: one group per row.

    Returns:
        The :class:`GroupPlan` (CPU tensors are moved to the prompts' device).
    """
    device = prompts[0].device
    lp = [int(p.numel()) for p in prompts]
    lr = [[int(c.numel()) for c in cs] for cs in completions]
    if min(lp) < 1:
        raise ValueError("every prompt needs at least one token (its last logit scores the first completion token)")
    size = [a + sum(b) for a, b in zip(lp, lr)]
    rows = _group_rows(size, pack)
    S = max(sum(size[b] for b in r) for r in rows)
    base = [0] * len(prompts)  # flat packed index of each group's first token
    for r, groups in enumerate(rows):
        at = 0
        for b in groups:
            base[b] = r * S + at
            at += size[b]
    B, max_lp, max_lr = len(prompts), max(lp), max(max(b) for b in lr)
    ids = torch.zeros(len(rows) * S, dtype=torch.long, device=device)
    pos = torch.zeros(len(rows) * S, dtype=torch.long, device=device)
    prefix_gather = torch.zeros(B, max_lp, dtype=torch.long)
    prefix_valid = torch.zeros(B, max_lp, dtype=torch.bool)
    suffix_gather, suffix_valid, row_of, pred = [], [], [], []
    for b, (p, cs) in enumerate(zip(prompts, completions)):
        o = base[b]
        ids[o: o + lp[b]] = p
        pos[o: o + lp[b]] = torch.arange(lp[b])
        prefix_gather[b] = o  # pad slots point at the group's first token
        prefix_gather[b, : lp[b]] += torch.arange(lp[b])
        prefix_valid[b, : lp[b]] = True
        start = lp[b]
        for c in cs:
            n = c.numel()
            ids[o + start: o + start + n] = c
            pos[o + start: o + start + n] = torch.arange(lp[b], lp[b] + n)
            # R[0] is scored by the last prompt logit (shared by the group); R[t] by position start+t-1.
            # A plain one-step shift over the packed row would score R_j[0] from R_{j-1}'s last token.
            pred.append(o + torch.cat([torch.tensor([lp[b] - 1]), torch.arange(start, start + n - 1)]))
            g = torch.full((max_lr,), o, dtype=torch.long)
            g[:n] = o + start + torch.arange(n)
            v = torch.zeros(max_lr, dtype=torch.bool)
            v[:n] = True
            suffix_gather.append(g)
            suffix_valid.append(v)
            row_of.append(b)
            start += n
    ids, pos = ids.view(len(rows), S), pos.view(len(rows), S)
    suffix_gather_t = torch.stack(suffix_gather)  # [N, maxLr]
    suffix_valid_t = torch.stack(suffix_valid)  # [N, maxLr]
    # Real tokens of the concatenated (prefix slots, suffix slots) list -> their packed positions.
    all_gather = torch.cat([prefix_gather.flatten(), suffix_gather_t.flatten()])
    all_valid = torch.cat([prefix_valid.flatten(), suffix_valid_t.flatten()])
    scatter_src = all_valid.nonzero().squeeze(1)
    return GroupPlan(
        input_ids=ids,
        position_ids=pos,
        prefix_gather=prefix_gather.flatten().to(device),
        prefix_valid=prefix_valid.to(device),
        suffix_gather=suffix_gather_t.flatten().to(device),
        suffix_valid=suffix_valid_t.to(device),
        row_of=torch.tensor(row_of, dtype=torch.long, device=device),
        scatter_src=scatter_src.to(device),
        scatter_dst=all_gather[scatter_src].to(device),
        max_span=max(a + max(b) for a, b in zip(lp, lr)),
        pred_idx=torch.cat(pred).to(device),
        targets=torch.cat([c for cs in completions for c in cs]).to(device),
    )


def _group_rows(size: list[int], pack: bool) -> list[list[int]]:
    """Groups per physical row: best fit into rows as long as the longest group, or one each."""
    if not pack:
        return [[b] for b in range(len(size))]
    from effsft.models.packing import plan_packs

    return sorted(plan_packs(size, max(size), "bfd").packs)  # rows in group order
