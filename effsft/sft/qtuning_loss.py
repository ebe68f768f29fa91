"""One Q-Tuning training-step loss for a plain HF causal LM (Llama / Qwen2 families), no Ray.

Two modes (docs/algorithms/qtuning.md §3.3), which select the same samples and tokens for the same model state:

* ``mask`` (the authors' way, ≈ 3F(B)): one forward with grad over the whole micro-batch; the
  selection runs on detached statistics of that forward and becomes a loss mask.
* ``two_pass`` (effsft, ≈ F(B) + 3F(kB)): a no-grad scoring forward of the whole micro-batch, then
  forward + backward on the kept rows only, with the token mask applied to their labels. Token
  pruning saves nothing here (dropped tokens stay in the context); dropping rows does.

Statistics and the loss are computed from the final hidden states with the chunked helpers of
:mod:`effsft.sft.token_stats`, so no ``[B, T, V]`` fp32 tensor is built.

``score_scope: global`` (§3.2) is supported through an ``all_gather`` callable (e.g. a wrapper of
``torch.distributed.all_gather_object``); the selection then runs on the rank-ordered concatenation
and the loss is scaled so that the *mean* of the ranks' losses (what DDP/DeepSpeed average) equals
the loss of the concatenated batch.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal

import torch

from effsft.corpus.tokenize import IGNORE_INDEX
from effsft.models.parts import decoder_and_head
from effsft.models.packing import RowBatch
from effsft.sft.qtuning import eu_select, make_rng, pad_concat, split_rows
from effsft.sft.qtuning_scores import SampleStats, sample_stats, token_scores
from effsft.sft.token_stats import (
    DEFAULT_CHUNK_TOKENS,
    TokenStats,
    hidden_sft_loss,
    label_masks,
    loss_denominator,
    token_stats_from_hidden,
)

Mode = Literal["mask", "two_pass"]
AllGather = Callable[[Any], list]

# Methods whose selection reads the scores; the others need no scoring forward in two_pass.
_NEEDS_NLL = ("qtuning", "ppl_only")
_NEEDS_ENTROPY = ("qtuning", "entropy_only")
TWO_PASS_BREAK_EVEN = 0.6  # F(B) + 3F(kB) < 3F(B) needs k < 2/3; warn a bit earlier (§3.3)


def _score(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, masks: tuple, cfg: Any, chunk_tokens: int
) -> TokenStats:
    response, nonpad = masks
    stat_mask = nonpad if (cfg.entropy_scope == "all" and cfg.method in _NEEDS_ENTROPY) else response
    return token_stats_from_hidden(
        hidden, weight, labels, stat_mask, with_entropy=cfg.method in _NEEDS_ENTROPY, chunk_tokens=chunk_tokens
    )


def _select(
    tstats: TokenStats, masks: tuple, cfg: Any, step: int, all_gather: AllGather | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor, dict, int | None]:
    """Run the shared float64 selection; locally, or on the all-gathered batch (global scope).

    Returns:
        ``(keep_sample [B], keep_token [B, T], info, global_denominator or None)``.
    """
    response, nonpad = masks
    stats = sample_stats(tstats.nll, tstats.entropy, response, nonpad, cfg.entropy_scope)
    scores = token_scores(tstats.nll, response, nonpad, cfg.lam, cfg.neighbor_div2)
    resp_np, nonpad_np = response.cpu().numpy(), nonpad.cpu().numpy()
    if all_gather is not None:
        parts = all_gather((stats.to_array(), scores, resp_np, nonpad_np))
        sizes = [p[0].shape[0] for p in parts]
        stats = SampleStats.concat([SampleStats.from_array(p[0]) for p in parts])
        scores, resp_np, nonpad_np = (pad_concat([p[i] for p in parts]) for i in (1, 2, 3))
    keep_sample, keep_token, info = eu_select(
        stats, scores, resp_np, nonpad_np, cfg.sample_ratio, cfg.token_ratio,
        method=cfg.method, token_budget=cfg.token_budget, baseline_order=cfg.baseline_order,
        rng=make_rng(cfg.seed, step),
    )
    global_den = None
    if all_gather is not None:
        global_den = int(loss_denominator(torch.from_numpy(keep_token), torch.from_numpy(resp_np), cfg.loss_norm))
        info["world_size"] = len(sizes)
        keep_sample = split_rows(keep_sample[:, None], sizes, rank)[:, 0]
        keep_token = split_rows(keep_token, sizes, rank)[:, : response.shape[1]]
    device = response.device
    return torch.from_numpy(keep_sample).to(device), torch.from_numpy(keep_token).to(device), info, global_den


def _loss_scale(global_den: int | None, info: dict) -> tuple[int | None, float]:
    """(denominator override, multiplier): global scope divides by the gathered count, times W."""
    if global_den is None:
        return None, 1.0
    return global_den, float(info["world_size"])


def _mask_step(model, batch, cfg, step, chunk_tokens, all_gather, rank):
    decoder, head = decoder_and_head(model)
    weight = head.weight
    rb = RowBatch(batch)  # padded or packed: the selection sees rows [B, T]
    labels = rb.labels
    masks = label_masks(labels, rb.attention_mask)
    hidden = rb.hidden(decoder)  # [B, T, H], with grad
    tstats = _score(hidden, weight, labels, masks, cfg, chunk_tokens)
    keep_sample, keep_token, info, global_den = _select(tstats, masks, cfg, step, all_gather, rank)
    den, scale = _loss_scale(global_den, info)
    loss, num, den_used = hidden_sft_loss(
        hidden, weight, labels, tstats.nll, keep_token, masks[0], cfg.loss_norm, chunk_tokens, denominator=den
    )
    info.update(loss_numerator=float(num), loss_denominator=int(den_used), pass2_rows=int(labels.shape[0]))
    return loss * scale, info, keep_token


def _two_pass_step(model, batch, cfg, step, chunk_tokens, all_gather, rank):
    decoder, head = decoder_and_head(model)
    weight = head.weight
    rb = RowBatch(batch)
    labels = rb.labels
    masks = label_masks(labels, rb.attention_mask)
    if cfg.method in _NEEDS_NLL + _NEEDS_ENTROPY:
        with torch.no_grad():  # pass 1: score the whole micro-batch
            tstats = _score(rb.hidden(decoder), weight, labels, masks, cfg, chunk_tokens)
    else:  # random baselines read only the masks
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        tstats = TokenStats(nll=zeros, entropy=zeros)
    keep_sample, keep_token, info, global_den = _select(tstats, masks, cfg, step, all_gather, rank)
    den, scale = _loss_scale(global_den, info)
    if den is None:
        den = loss_denominator(keep_token, masks[0], cfg.loss_norm)
    rows = keep_sample.nonzero().squeeze(1)
    if rows.numel() == 0:  # global scope: this rank keeps nothing -> zero-weighted pass on one row
        rows, scale = torch.zeros(1, dtype=torch.long, device=labels.device), 0.0
    sub = rb.subset(rows)  # the kept rows only (cropped, or packed again): dropped rows cost nothing
    n_cols = int(sub.labels.shape[1])
    sub_keep = keep_token[rows, :n_cols]  # [k, Tc]
    sub_resp = masks[0][rows, :n_cols]
    sub_labels = sub.labels.masked_fill(~sub_keep, IGNORE_INDEX)  # token mask applied to labels
    hidden = sub.hidden(decoder)  # pass 2, with grad
    sub_stats = token_stats_from_hidden(hidden, weight, sub_labels, sub_keep & sub_resp, with_entropy=False, chunk_tokens=chunk_tokens)
    loss, num, den_used = hidden_sft_loss(
        hidden, weight, sub_labels, sub_stats.nll, sub_keep, sub_resp, cfg.loss_norm, chunk_tokens, denominator=den
    )
    info.update(loss_numerator=float(num), loss_denominator=int(den_used), pass2_rows=int(rows.numel()), pass2_cols=n_cols)
    return loss * scale, info, keep_token


def qtuning_step_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: Any,
    mode: Mode | None = None,
    *,
    step: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    all_gather: AllGather | None = None,
    rank: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch with Q-Tuning (or a baseline, or plain SFT when ``method: off``).

    Args:
        model: HF causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...), dropout 0 for the
            mode-equivalence guarantee.
        batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt/pad), all ``[B, T]``;
            or a packed micro-batch (:func:`effsft.models.packing.pack_rows`), selected per row.
        cfg: an object with the :class:`QTuningConfig` attributes (the recipe's ``qtuning`` section).
        mode: ``mask`` or ``two_pass``; default ``cfg.mode``.
        step: global step (seeds the random baselines together with ``cfg.seed``).
        chunk_tokens: lm_head rows per chunk.
        all_gather: for ``score_scope: global``, ``f(obj) -> [obj_rank0, ..., obj_rankW-1]``.
        rank: this rank's index in ``all_gather``'s list.

    Returns:
        ``(loss, info)``: call ``loss.backward()``; ``info`` is :func:`effsft.sft.qtuning.eu_select`'s
        dict plus ``loss_numerator``, ``loss_denominator``, ``pass2_rows``, ``mode`` and ``keep_token``
        (``[B, T]`` bool tensor).
    """
    mode = mode or cfg.mode
    if cfg.score_scope == "global" and all_gather is None:
        raise ValueError("qtuning.score_scope: global needs an all_gather callable")
    if mode == "two_pass" and cfg.method != "off":
        if cfg.sample_ratio > TWO_PASS_BREAK_EVEN:
            warnings.warn(f"qtuning.mode=two_pass saves nothing at sample_ratio={cfg.sample_ratio} (> ~0.6)", stacklevel=2)
        loss, info, keep_token = _two_pass_step(model, batch, cfg, step, chunk_tokens, all_gather, rank)
    elif mode in ("mask", "two_pass"):  # plain SFT has nothing to skip: one pass
        loss, info, keep_token = _mask_step(model, batch, cfg, step, chunk_tokens, all_gather, rank)
    else:
        raise ValueError(f"qtuning.mode must be 'mask' or 'two_pass', got {mode!r}")
    info["mode"] = mode
    info["keep_token"] = keep_token
    if info.get("total_response_tokens", 0) and not info.get("kept_response_tokens", 1):
        warnings.warn(NO_RESPONSE_KEPT.format(budget=cfg.token_budget), stacklevel=2)
    return loss, info


# The paper's batch budget counts prompt tokens in T_all (drop_goal = T_all - round(T_all r_s r_t))
# but drops response tokens only: where prompts are a large share of the tokens, a batch whose
# kept rows are all token-pruned can lose every response token (measured in the real-model study:
# entropy_only at 25 % x 50 % kept none on any step).
NO_RESPONSE_KEPT = ("qtuning: a step kept no response token, so it does not train (qtuning.token_budget={budget}; "
                    "'batch' counts prompt tokens in the budget but drops response tokens only); "
                    "qtuning.token_budget=per_sample keeps ceil(token_ratio * n) tokens of every pruned row")
