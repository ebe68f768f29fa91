"""Shared-prefix ("Prefix Grouper") log-probabilities for GRPO.

The ordinary GRPO forward builds G rows ``[P; R_i]`` per prompt P, so P is encoded G times. Every op
except attention is token-wise, so one packed row ``[P; R_1; ...; R_G]`` gives the same per-token
values if attention shows each token exactly what it would see in its own row (Prefix Grouper,
arXiv 2506.05433, Sec. 3; Lemma 2.1 for the gradient equivalence).

How it plugs into transformers (no forked model code; the pieces live in
:mod:`effsft.grpo.group_plan`, the batch layout, and :mod:`effsft.grpo.attention`):

* ``register_grouped_attention(base)`` registers ``"effsft_grouped_<base>"`` in transformers'
  ``AttentionInterface`` and the base backend's mask builder under the same name in
  ``AttentionMaskInterface`` (without a mask builder transformers skips the mask and passes ``None``).
* When the forward kwargs carry ``effsft_pg_plan`` (a :class:`~effsft.grpo.group_plan.GroupPlan`; the
  models forward their ``**kwargs`` down to the attention call), the function runs the two-call grouped attention
  with explicit additive float masks and ignores the incoming mask. Without a plan it delegates to
  the wrapped backend unchanged, so a model left in grouped mode still works for ordinary use.
* :func:`completion_logprobs` switches the model to the grouped name only for the duration of the
  call (context manager :func:`~effsft.grpo.attention.grouped_attention_mode`) and restores the
  original implementation.

Tested with transformers 5.23 (Llama, Qwen2, Qwen3, Mistral; also Gemma, OLMo2, Phi3, Qwen3-MoE, and
FlexAttention-mode models without grad on CPU); the supported range is pinned to
``>=5.0,<6`` because the Attention/Mask interfaces and the mask-builder call signature are v5 API.
"""

from __future__ import annotations

import math

import torch

from effsft.grpo.attention import GROUPED_FORWARD_ACTIVE, PLAN_KWARG, grouped_attention_mode
from effsft.grpo.group_plan import build_plan

LOGPROB_CHUNK = 4096  # tokens per LM-head chunk: bounds the fp32 [chunk, V] logits buffer


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------
def _check_training_dropout(model) -> None:
    p = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
    if model.training and p > 0:
        raise ValueError(f"attention_dropout={p} > 0 in training breaks grouped/repeated equivalence; set it to 0")


def _gathered_logprobs(model, hidden: torch.Tensor, pred_idx: torch.Tensor, targets: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """log p(target) at selected positions; the LM head runs only there.

    Args:
        hidden: ``[B * S, H]`` final hidden states (after the final norm).
        pred_idx: ``[M]`` flat positions whose logits predict ``targets`` ``[M]``.

    Returns:
        ``[M]`` log-probs in fp32 (fp64 for an fp64 model).
    """
    head = model.get_output_embeddings()
    out = []
    for lo in range(0, pred_idx.numel(), LOGPROB_CHUNK):
        h = hidden.index_select(0, pred_idx[lo : lo + LOGPROB_CHUNK])  # [m, H]
        logits = head(h)  # [m, V]
        # fp32 at least (bf16/fp16 logits lose precision in log-softmax); fp64 stays fp64
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        tgt = targets[lo : lo + LOGPROB_CHUNK, None]  # [m, 1]
        out.append(logits.log_softmax(-1).gather(-1, tgt).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _decoder_hidden(model, input_ids, position_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    """``[B, S]`` ids -> ``[B * S, H]`` final hidden states (the decoder without the LM head)."""
    out = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    )
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h.reshape(-1, h.shape[-1])


def _grouped_logprobs(model, prompts, completions, temperature) -> list[torch.Tensor]:
    """Grouped path: one packed row per prompt group, groups with only empty completions skipped."""
    keep = [b for b, cs in enumerate(completions) if any(c.numel() for c in cs)]
    groups = [[c for c in completions[b] if c.numel()] for b in keep]
    plan = build_plan([prompts[b] for b in keep], groups)
    token = GROUPED_FORWARD_ACTIVE.set(True)
    try:
        with grouped_attention_mode(model):
            hidden = _decoder_hidden(model, plan.input_ids, plan.position_ids, **{PLAN_KWARG: plan})
    finally:
        GROUPED_FORWARD_ACTIVE.reset(token)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if n_layers is not None and plan.calls != n_layers:
        raise RuntimeError(f"only {plan.calls}/{n_layers} attention layers consumed the grouped plan")
    lps = _gathered_logprobs(model, hidden, plan.pred_idx, plan.targets, temperature)
    return _split_back(lps, completions)


def _repeated_logprobs(model, prompts, completions, temperature) -> list[torch.Tensor]:
    """Baseline: one right-padded row ``[P; R_i]`` per non-empty completion."""
    rows = [(p, c) for p, cs in zip(prompts, completions) for c in cs if c.numel()]
    device = prompts[0].device
    S = max(p.numel() + c.numel() for p, c in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long, device=device)
    att = torch.zeros(len(rows), S, dtype=torch.long, device=device)
    pred, tgt = [], []
    for i, (p, c) in enumerate(rows):
        L = p.numel() + c.numel()
        ids[i, :L] = torch.cat([p, c])
        att[i, :L] = 1
        pred.append(torch.arange(p.numel() - 1, L - 1) + i * S)
        tgt.append(c)
    pos = torch.arange(S, device=device).expand(len(rows), S)
    hidden = _decoder_hidden(model, ids, pos, attention_mask=att)
    lps = _gathered_logprobs(model, hidden, torch.cat(pred).to(device), torch.cat(tgt).to(device), temperature)
    return _split_back(lps, completions)


def _split_back(lps: torch.Tensor, completions) -> list[torch.Tensor]:
    """Flat ``[M]`` log-probs of the non-empty completions -> prompt-major list incl. empty ones."""
    sizes = [c.numel() for cs in completions for c in cs]
    return list(torch.split(lps, sizes))


def completion_logprobs(
    model,
    prompts: list[torch.Tensor],
    completions: list[list[torch.Tensor]],
    grouped: bool = True,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of every completion given its prompt.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Qwen3, Mistral, ... using AttentionInterface).
        prompts: B 1-D LongTensors (unpadded, length >= 1).
        completions: per prompt a list of 1-D LongTensors (its group; sizes may differ; may be empty).
        grouped: True = shared-prefix packed forward; False = ordinary repeated-prefix forward.
        temperature: logits are divided by it before the fp32 log-softmax (as at sampling time).

    Returns:
        Flat prompt-major list; entry k is a 1-D fp32 (fp64 for fp64 models) tensor ``[len(R_k)]`` of
        ``log p(R_k[t] | P, R_k[:t])``; differentiable w.r.t. the model parameters. Empty
        completions give empty tensors.

    Raises:
        ValueError: attention dropout > 0 in training, or an active sliding window shorter than
            ``Lp + Lr``.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion groups")
    _check_training_dropout(model)
    if not any(c.numel() for cs in completions for c in cs):
        return [c.new_zeros(0, dtype=torch.float32) for cs in completions for c in cs]
    fn = _grouped_logprobs if grouped else _repeated_logprobs
    return fn(model, prompts, completions, temperature)


def split_padded(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """``[B, T]`` ids + mask (either padding side) -> B 1-D tensors of the valid tokens."""
    return [row[m.bool()] for row, m in zip(ids, mask)]


# ----------------------------------------------------------------------------------------------
# Theoretical cost (paper Lemma 2.2, docs/algorithms/prefix_grouper_grpo.md §1)
# ----------------------------------------------------------------------------------------------
def cost_coefficients(model) -> tuple[float, float, float]:
    """``(c_pw, c_att, c_head)`` FLOPs: ~2 * non-embedding params per token; 4 * layers * heads *
    head_dim per q-k pair; 2 * vocab * hidden per token that goes through the LM head."""
    cfg = model.config
    emb = sum(m.weight.numel() for m in {model.get_input_embeddings(), model.get_output_embeddings()})
    n_nonemb = sum(p.numel() for p in model.parameters()) - emb
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2.0 * n_nonemb, 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim, \
        2.0 * model.get_output_embeddings().weight.numel()


def theoretical_ratios(G: int, Lp: float, Lr: float, c_pw: float | None = None,
                       c_att: float | None = None, c_head: float | None = None) -> dict[str, float]:
    """Grouped / repeated FLOP ratios of one prompt group.

    Args:
        G: completions per prompt; Lp, Lr: prompt and completion lengths.
        c_pw, c_att, c_head: per-token, per-(q, k)-pair and per-scored-token LM-head costs (see
            :func:`cost_coefficients`); ``combined`` is NaN without the first two, ``total`` without
            all three.

    Returns:
        ``{"pointwise", "attention", "combined", "total"}``: the decoder's pointwise ops, its
        attention, both weighted by FLOPs, and ``total`` = combined plus the LM head on the G * Lr
        completion positions, which both paths compute (it is what prefix sharing cannot save).
    """
    pointwise = (Lp + G * Lr) / (G * (Lp + Lr))
    attention = (Lp**2 + G * Lr * (2 * Lp + Lr)) / (G * (Lp + Lr) ** 2)
    combined = total = math.nan
    if c_pw is not None and c_att is not None:
        num = c_pw * (Lp + G * Lr) + c_att * (Lp**2 / 2 + G * (Lr * Lp + Lr**2 / 2))
        den = G * (c_pw * (Lp + Lr) + c_att * (Lp + Lr) ** 2 / 2)
        combined = num / den if den else math.nan
        if c_head is not None:
            total = (num + c_head * G * Lr) / (den + c_head * G * Lr)
    return {"pointwise": pointwise, "attention": attention, "combined": combined, "total": total}
