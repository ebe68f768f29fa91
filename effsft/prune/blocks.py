"""The decoder's blocks as ``effsft prune`` walks them: where they are in an HF causal LM
(:func:`find_layout`), block 0's inputs captured and replayed block by block, and forward hooks
that sum each Linear's input statistics (``Σx²`` for Wanda, ``H ∝ Σxxᵀ`` for SparseGPT)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache")
_FINAL_MODULE_NAMES = ("norm", "final_layer_norm", "ln_f", "final_norm", "project_out")


# ----------------------------------------------------------------------------- model layout


@dataclass
class DecoderLayout:
    """Where the pieces of a decoder-only LM are.

    Attributes:
        layers: the ``nn.ModuleList`` of decoder blocks.
        prefix: qualified name of ``layers`` in the model (``model.layers``).
        trunk: the module that owns ``layers`` (embeddings, rotary, final norm live here).
        final: modules applied after the last block, in order (final norm, OPT's project_out).
        head: the output projection (``lm_head``).
    """

    layers: nn.ModuleList
    prefix: str
    trunk: nn.Module
    final: list[nn.Module]
    head: nn.Module


def find_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder blocks, final norm and head of an HF causal LM.

    The blocks are the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries that
    contain ``nn.Linear`` layers (shortest name wins). Mixed sliding/full attention models
    are rejected (their blocks need different masks; v1 captures one set of kwargs).
    """
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise NotImplementedError(f"mixed attention layer types {sorted(set(layer_types))} are not supported in v1")
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and (n_layers is None or len(mod) == n_layers)
        and all(any(isinstance(m, nn.Linear) for m in blk.modules()) for blk in mod)
    ]
    if not candidates:
        raise ValueError("could not find the ModuleList of decoder blocks")
    prefix, layers = min(candidates, key=lambda c: (c[0].count("."), len(c[0])))
    trunk = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    final = [getattr(trunk, n) for n in _FINAL_MODULE_NAMES if isinstance(getattr(trunk, n, None), nn.Module)]
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("model has no output embeddings (lm_head)")
    return DecoderLayout(layers=layers, prefix=prefix, trunk=trunk, final=final, head=head)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable matrices of a block: every ``nn.Linear`` (biases are never pruned)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def host_device(layout: DecoderLayout) -> torch.device:
    return next(layout.layers[0].parameters()).device


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- capture / replay


class _Captured(Exception):
    """Raised by the block-0 pre-hook to stop the forward once the inputs are stored."""


@dataclass
class BlockInputs:
    """Activations entering the current block, in micro-batches.

    Attributes:
        hidden: list of ``[b, T, d]`` tensors on the run device.
        kwargs: per micro-batch size, the kwargs block 0 received (cache args removed).
    """

    hidden: list[torch.Tensor]
    kwargs: dict[int, dict] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return sum(x.shape[0] for x in self.hidden)


@contextlib.contextmanager
def _trunk_on(layout: DecoderLayout, device: torch.device | str) -> Iterator[None]:
    """Temporarily move the non-block parts of the trunk (embeddings, rotary...) to ``device``."""
    host = host_device(layout)
    parts = [m for m in layout.trunk.children() if m is not layout.layers]
    for m in parts:
        m.to(device)
    try:
        yield
    finally:
        for m in parts:
            m.to(host)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start : start + batch_size]


@torch.no_grad()
def capture_inputs(model: nn.Module, layout: DecoderLayout, ids: torch.Tensor,
                   device: torch.device | str, batch_size: int = 1) -> BlockInputs:
    """Run the model up to block 0 and keep what block 0 receives.

    Args:
        ids: ``[N, T]`` token ids (unpadded windows; the kwargs are then identical for every
            micro-batch of the same size, so they are stored once per size).

    Returns:
        :class:`BlockInputs` on ``device``.
    """
    store = BlockInputs(hidden=[])

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(args) > 1:
            raise NotImplementedError("decoder blocks called with more than one positional argument")
        hidden = args[0] if args else kwargs["hidden_states"]
        store.hidden.append(hidden.detach())
        size = hidden.shape[0]
        if size not in store.kwargs:
            store.kwargs[size] = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and k != "hidden_states"}
        raise _Captured

    handle = layout.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with _trunk_on(layout, device):
            for batch in batches(ids, batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _Captured:
                    pass
                else:
                    raise RuntimeError("block 0 was never called during the capture forward")
    finally:
        handle.remove()
    return store


def _unwrap(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """Replay one block over all micro-batches; returns the outputs ``[b, T, d]`` per batch."""
    return [_unwrap(block(x, **inputs.kwargs[x.shape[0]])) for x in inputs.hidden]


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | str, host: torch.device) -> Iterator[nn.Module]:
    module.to(device)
    try:
        yield module
    finally:
        module.to(host)


# ----------------------------------------------------------------------------- activation hooks


@contextlib.contextmanager
def _input_hooks(linears: dict[str, nn.Linear], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Forward hooks calling ``fn(name, x2d)`` with each Linear's input ``[tokens, in]`` in fp32."""

    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            fn(name, x.reshape(-1, x.shape[-1]).float())

        return hook

    handles = [lin.register_forward_hook(make(name)) for name, lin in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_sq_norms(block: nn.Module, inputs: BlockInputs) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One hooked forward: ``acc_j = Σ_tokens x²`` ``[in]`` per Linear, and the block outputs."""
    linears = block_linears(block)
    acc = {n: torch.zeros(l.in_features, dtype=torch.float32, device=l.weight.device) for n, l in linears.items()}

    def add(name: str, x: torch.Tensor) -> None:
        acc[name] += x.pow(2).sum(0)

    with _input_hooks(linears, add):
        outs = run_block(block, inputs)
    return acc, outs


@torch.no_grad()
def collect_hessians(block: nn.Module, inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """One hooked forward: ``H_j = Σ x xᵀ / n_tokens`` ``[in, in]`` (fp32) per Linear."""
    linears = block_linears(block)
    H = {n: torch.zeros(l.in_features, l.in_features, dtype=torch.float32, device=l.weight.device)
         for n, l in linears.items()}
    tokens = dict.fromkeys(linears, 0)

    def add(name: str, x: torch.Tensor) -> None:
        H[name].addmm_(x.t(), x)
        tokens[name] += x.shape[0]

    with _input_hooks(linears, add):
        run_block(block, inputs)
    return {n: h / max(tokens[n], 1) for n, h in H.items()}
