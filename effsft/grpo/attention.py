"""Prefix-grouped attention (two masked calls per layer over a :class:`~effsft.grpo.group_plan.GroupPlan`)
and its registration in transformers' Attention/Mask interfaces (pure tensor code)."""

from __future__ import annotations

import contextlib
import contextvars
import sys

import torch
import torch.nn.functional as F

from effsft.grpo.group_plan import GroupPlan

PLAN_KWARG = "effsft_pg_plan"
GROUPED_PREFIX = "effsft_grouped_"

# Set while a grouped forward runs: the registered mask builder then returns None, because the
# grouped attention builds its own masks and the base builder would materialise an [B, S, S] mask.
GROUPED_FORWARD_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "effsft_grouped_forward_active", default=False
)


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
        if GROUPED_FORWARD_ACTIVE.get():
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
