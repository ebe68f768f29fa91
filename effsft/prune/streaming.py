"""Evaluation streamed block by block, one block on the device at a time: the logits and the
perplexity over non-overlapping windows of a model whose weights stay in host RAM."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from effsft.prune.blocks import (
    BlockInputs,
    DecoderLayout,
    batches,
    capture_inputs,
    eval_mode,
    find_layout,
    host_device,
    on_device,
    run_block,
)


@torch.no_grad()
def _stream_through_blocks(model: nn.Module, layout: DecoderLayout, ids: torch.Tensor,
                           device: torch.device | str, batch_size: int) -> BlockInputs:
    host = host_device(layout)
    inputs = capture_inputs(model, layout, ids, device, batch_size)
    for block in layout.layers:
        with on_device(block, device, host):
            inputs.hidden = run_block(block, inputs)
    return inputs


@torch.no_grad()
def _head_outputs(layout: DecoderLayout, hidden: list[torch.Tensor], device: torch.device | str,
                  fn: Callable[[torch.Tensor], None]) -> None:
    """Apply final modules + lm_head to each micro-batch and hand ``logits [b, T, V]`` to ``fn``."""
    host = host_device(layout)
    mods = [*layout.final, layout.head]
    for m in mods:
        m.to(device)
    try:
        for h in hidden:
            for m in mods:
                h = m(h)
            fn(h)
    finally:
        for m in mods:
            m.to(host)


@torch.no_grad()
def streaming_logits(model: nn.Module, ids: torch.Tensor, device: torch.device | str = "cpu",
                     batch_size: int = 1) -> torch.Tensor:
    """Logits ``[N, T, V]`` (on CPU) computed block by block: blocks, final norm, lm_head."""
    layout = find_layout(model)
    with eval_mode(model):
        inputs = _stream_through_blocks(model, layout, ids, device, batch_size)
        chunks: list[torch.Tensor] = []
        _head_outputs(layout, inputs.hidden, device, lambda z: chunks.append(z.float().cpu()))
    return torch.cat(chunks)


@torch.no_grad()
def perplexity(model: nn.Module, ids_windows: torch.Tensor, device: torch.device | str = "cpu",
               batch_size: int = 1) -> float:
    """Perplexity over non-overlapping windows, streamed block by block.

    Args:
        ids_windows: ``[W, T]`` windows (see :func:`effsft.prune.calibration.make_windows`);
            every window predicts its own tokens 1..T-1.

    Returns:
        ``exp(mean token NLL)`` over all ``W·(T-1)`` predictions.
    """
    layout = find_layout(model)
    nll, count = [0.0], [0]
    targets = iter(list(batches(ids_windows, batch_size)))

    def consume(logits: torch.Tensor) -> None:  # logits [b, T, V]
        y = next(targets).to(logits.device)  # [b, T]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), reduction="sum")
        nll[0] += float(loss.item())
        count[0] += y[:, 1:].numel()

    with eval_mode(model):
        inputs = _stream_through_blocks(model, layout, ids_windows, device, batch_size)
        _head_outputs(layout, inputs.hidden, device, consume)
    return math.exp(nll[0] / count[0])
