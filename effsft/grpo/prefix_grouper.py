"""Shared-prefix ("Prefix Grouper") log-probabilities for GRPO.

The ordinary GRPO forward builds G rows ``[P; R_i]`` per prompt P, so P is encoded G times. Every op
except attention is token-wise, so one packed row ``[P; R_1; ...; R_G]`` gives the same per-token
values if attention shows each token exactly what it would see in its own row (Prefix Grouper,
arXiv 2506.05433, Sec. 3; Lemma 2.1 for the gradient equivalence).

How it plugs into transformers (no forked model code):

* ``register_grouped_attention(base)`` registers ``"effsft_grouped_<base>"`` in transformers'
  ``AttentionInterface`` and the base backend's mask builder under the same name in
  ``AttentionMaskInterface`` (without a mask builder transformers skips the mask and passes ``None``).
* When the forward kwargs carry ``effsft_pg_plan`` (a :class:`GroupPlan`; the models forward their
  ``**kwargs`` down to the attention call), the function runs the two-call grouped attention
  with explicit additive float masks and ignores the incoming mask. Without a plan it delegates to
  the wrapped backend unchanged, so a model left in grouped mode still works for ordinary use.
* :func:`completion_logprobs` switches the model to the grouped name only for the duration of the
  call (context manager :func:`grouped_attention_mode`) and restores the original implementation.

Tested with transformers 5.23 (Llama, Qwen2, Qwen3, Mistral; also Gemma, OLMo2, Phi3, Qwen3-MoE, and
FlexAttention-mode models without grad on CPU); the supported range is pinned to
``>=5.0,<6`` because the Attention/Mask interfaces and the mask-builder call signature are v5 API.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PLAN_KWARG = "effsft_pg_plan"
GROUPED_PREFIX = "effsft_grouped_"
LOGPROB_CHUNK = 4096  # tokens per LM-head chunk: bounds the fp32 [chunk, V] logits buffer

# Set while a grouped forward runs: the registered mask builder then returns None, because the
# grouped attention builds its own masks and the base builder would materialise an [B, S, S] mask.
_GROUPED_FORWARD_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "effsft_grouped_forward_active", default=False
)


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


# ----------------------------------------------------------------------------------------------
# Grouped attention (docs/algorithms/prefix_grouper_grpo.md §1: two kernel calls per layer)
# ----------------------------------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[n, Hkv, L, d] -> [n, Hkv * n_rep, L, d]`` (GQA), same layout as transformers' repeat_kv."""
    if n_rep == 1:
        return x
    n, h, L, d = x.shape
    return x[:, :, None].expand(n, h, n_rep, L, d).reshape(n, h * n_rep, L, d)


def attend(q, k, v, add_mask, scaling: float, math_impl: str) -> torch.Tensor:
    """Masked attention with an explicit additive float mask.

    Args:
        q: ``[n, Hq, Lq, d]``; k, v: ``[n, Hkv, Lk, d]``; add_mask: ``[n, 1, Lq, Lk]``.
        scaling: softmax scale.
        math_impl: ``"eager"`` (transformers' eager math: fp32 softmax) or ``"sdpa"``.

    Returns:
        ``[n, Hq, Lq, d]``.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if math_impl == "eager":
        w = torch.matmul(q, k.transpose(2, 3)) * scaling + add_mask  # [n, Hq, Lq, Lk]
        # fp32 softmax like transformers' eager; fp64 stays fp64 (exactness tests run in fp64)
        w = F.softmax(w, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        return torch.matmul(w, v)
    # Not is_causal=True: with Lq != Lk SDPA aligns the causal mask top-left and hides prefix keys.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=add_mask, scale=scaling)


def grouped_attention(query, key, value, plan: GroupPlan, scaling: float, math_impl: str = "sdpa") -> torch.Tensor:
    """Prefix-grouped attention over packed rows.

    Args:
        query: ``[B, Hq, S, d]``; key, value: ``[B, Hkv, S, d]`` (after projections and RoPE).
        plan: the micro-batch's :class:`GroupPlan`.
        scaling: softmax scale.
        math_impl: ``"eager"`` or ``"sdpa"``.

    Returns:
        ``[B, S, Hq, d]``; padded packed positions are 0.
    """
    B, Hq, S, d = query.shape          # B physical rows (each holds one or more groups)
    P, max_lp = plan.prefix_valid.shape  # P groups (prompts)
    N, max_lr = plan.suffix_valid.shape

    def gather(x, idx, rows, length):  # [B, H, S, d] -> [rows, H, length, d]
        h = x.shape[1]
        flat = x.transpose(1, 2).reshape(B * S, h, d)  # [B*S, H, d]
        return flat.index_select(0, idx).view(rows, length, h, d).transpose(1, 2)

    qp, kp, vp = (gather(x, plan.prefix_gather, P, max_lp) for x in (query, key, value))  # [P, H, maxLp, d]
    qs, ks, vs = (gather(x, plan.suffix_gather, N, max_lr) for x in (query, key, value))  # [N, H, maxLr, d]
    mask_p, mask_s = plan.additive_masks(query.dtype, query.device)
    op = attend(qp, kp, vp, mask_p, scaling, math_impl)  # [P, Hq, maxLp, d]
    # index_select's backward sums the G suffix contributions into each shared prefix K/V (Lemma 2.1).
    kc = torch.cat([kp.index_select(0, plan.row_of), ks], dim=2)  # [N, Hkv, maxLp + maxLr, d]
    vc = torch.cat([vp.index_select(0, plan.row_of), vs], dim=2)
    os_ = attend(qs, kc, vc, mask_s, scaling, math_impl)  # [N, Hq, maxLr, d]
    slots = torch.cat(
        [op.transpose(1, 2).reshape(P * max_lp, Hq, d), os_.transpose(1, 2).reshape(N * max_lr, Hq, d)]
    )  # [P*maxLp + N*maxLr, Hq, d]
    out = query.new_zeros(B * S, Hq, d).index_copy(0, plan.scatter_dst, slots.index_select(0, plan.scatter_src))
    return out.view(B, S, Hq, d)


def _base_function(base: str, module):
    """The wrapped backend's attention function (eager: the module's own modeling file's one)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_attention_fn(base: str):
    # GPU backends (flash/flex) run the same two-call math through SDPA with dense masks: exact, but
    # without their kernels' memory savings (varlen/flex kernels are a TODO, docs/algorithms/prefix_grouper_grpo.md §2 table).
    math_impl = "eager" if base == "eager" else "sdpa"

    def effsft_grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        plan = kwargs.pop(PLAN_KWARG, None)
        if plan is None:
            return _base_function(base, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if dropout and dropout > 0:
            raise ValueError("prefix-grouped attention needs attention dropout 0 (set config.attention_dropout=0)")
        window = kwargs.get("sliding_window")
        if window is not None and window < plan.max_span:
            raise ValueError(
                f"sliding_window={window} is shorter than prompt + completion ({plan.max_span} tokens); "
                "the grouped path does not implement windowed masks: use prefix_grouping=off"
            )
        plan.calls += 1
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return grouped_attention(query, key, value, plan, scale, math_impl), None

    effsft_grouped_attention.__name__ = f"effsft_grouped_{base}"
    return effsft_grouped_attention


def _make_mask_fn(base: str):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base_mask = ALL_MASK_ATTENTION_FUNCTIONS[base]

    def effsft_grouped_mask(*args, **kwargs):
        if _GROUPED_FORWARD_ACTIVE.get():
            return None  # the grouped attention ignores it; skip building an [B, 1, S, S] mask
        return base_mask(*args, **kwargs)

    return effsft_grouped_mask


def register_grouped_attention(base: str) -> str:
    """Register ``effsft_grouped_<base>`` (attention + mask builder); idempotent.

    Args:
        base: the wrapped backend, e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``.

    Returns:
        The registered name.
    """
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if base.startswith(GROUPED_PREFIX):
        return base
    name = GROUPED_PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention_fn(base))
        AttentionMaskInterface.register(name, _make_mask_fn(base))
    return name


@contextlib.contextmanager
def grouped_attention_mode(model):
    """Temporarily switch ``model`` to the grouped attention wrapper of its current backend.

    The original implementation is restored on exit (also on error), so the model is left
    unchanged for ordinary use. A model already in grouped mode is left as it is.
    """
    original = model.config._attn_implementation
    name = register_grouped_attention(original)
    if name != original:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if name != original:
            model.set_attn_implementation(original)


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
    token = _GROUPED_FORWARD_ACTIVE.set(True)
    try:
        with grouped_attention_mode(model):
            hidden = _decoder_hidden(model, plan.input_ids, plan.position_ids, **{PLAN_KWARG: plan})
    finally:
        _GROUPED_FORWARD_ACTIVE.reset(token)
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
