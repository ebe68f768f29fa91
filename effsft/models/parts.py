"""Locating the pieces of an HF causal LM that chunked losses and scorers compute with.

Chunked losses (SFT, Q-Tuning) and the selection scorers never materialise the full
``[B, T, V]`` logits: they run the decoder body once and apply ``lm_head`` to chunks of
hidden states. This module is the one place that knows how to split a model that way.
"""
from __future__ import annotations

import torch


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model: torch.nn.Module, *, plain_head: bool = True
                     ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning the final normed hidden states, lm_head module).

    Args:
        model: an HF ``*ForCausalLM`` (optionally peft-wrapped).
        plain_head: require ``logits = hidden @ W.T`` exactly (no bias, no logit soft-capping,
            no logit scale), which code that reads ``head.weight`` directly relies on. With
            False the caller applies :func:`head_logits_fp32` instead.

    Raises:
        ValueError: the model has no output embeddings.
        NotImplementedError: ``plain_head`` and the head is not a plain projection.
    """
    base = _base(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head)")
    cfg = base.config
    if plain_head and (getattr(head, "bias", None) is not None
                       or getattr(cfg, "final_logit_softcapping", None)
                       or getattr(cfg, "logit_scale", None)):
        raise NotImplementedError(f"{type(base).__name__}: lm_head with bias/soft-capping/scale "
                                  "is not supported by the chunked loss")
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    if body is None:
        body = getattr(base, base.base_model_prefix)
    return body, head


def head_logits_fp32(model: torch.nn.Module, head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``lm_head`` on a chunk of hidden states in fp32, with the model's logit soft-capping
    and scale applied as its own forward would. [m, H] -> [m, V]."""
    cfg = _base(model).config
    logits = head(h).float()
    scale = getattr(cfg, "logit_scale", None)  # Cohere style
    if scale:
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2 style
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
