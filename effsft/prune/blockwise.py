"""Block-by-block DLP/OWL/uniform pruning of a Hugging Face causal LM (no Ray).

Only the current decoder block and its input/output activations sit on ``device``; the
rest of the model stays where it is (host RAM). Works for decoders whose blocks live in one
``nn.ModuleList`` (Llama, Qwen2, Mistral, OPT, ...).

Pipeline (spec ``dlp.md`` §2):
    capture   forward pre-hook (``with_kwargs=True``) on block 0 stores the hidden states and
              every kwarg (attention mask, ``position_ids``, ``position_embeddings``, ...)
              and aborts the forward; blocks are replayed with those kwargs minus cache args.
    Pass A    dense propagation; hooks sum ``x_k^2`` per Linear input; per block the pooled
              Wanda scores give ``S_l`` (mean / exact median) and OWL's ``D_l``. Modifies
              nothing and leaves no hooks.
    allocate  :func:`effsft.prune.allocate.allocate` -> per-block ``s_l``.
    Pass B    sequential: inputs are the *pruned* previous blocks' outputs; one hooked forward
              collects ``Σx²`` (Wanda) or ``H ∝ Σxxᵀ`` (SparseGPT), every Linear is pruned at
              ``s_l`` (or N:M), then the pruned block propagates.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from effsft.prune.allocate import allocate
from effsft.prune.criteria import (
    exact_count,
    lowest_k_per_row,
    magnitude_mask,
    nm_mask,
    parse_nm,
    sparsegpt_prune_,
    wanda_scores,
)
from effsft.prune.stats import block_score_stats

log = logging.getLogger(__name__)

CRITERIA = ("wanda", "sparsegpt", "magnitude")
STATS = ("mean", "median")
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache")
_FINAL_MODULE_NAMES = ("norm", "final_layer_norm", "ln_f", "final_norm", "project_out")


@dataclass(frozen=True)
class PruneSettings:
    """Settings of one pruning run (mirrors the ``prune.*`` config keys).

    Attributes:
        method: ``dlp`` | ``owl`` | ``uniform`` (``prune.method``).
        criterion: ``wanda`` | ``sparsegpt`` | ``magnitude`` (``prune.criterion``).
        sparsity: global target over the prunable set, ``[0.01, 0.99]``.
        alpha: DLP ``α`` (band ``2α``).
        stat: ``median`` | ``mean``, DLP's block statistic ``S_l``.
        nm: ``"2:4"`` / ``"4:8"``: uniform N:M, overrides method and sparsity (with a warning).
        owl_m: OWL outlier threshold ``M`` (``prune.owl.M``).
        owl_lambda: OWL ``λ`` (``prune.owl.lambda``).
        median_approx: sample ``2^24`` scores instead of the exact radix-select median.
        sparsegpt_blocksize: SparseGPT lazy-update block width.
        sparsegpt_percdamp: SparseGPT damping relative to ``mean(diag H)``.
        device: where the current block and the activations run (``cuda``, ``cpu``...).
        batch_size: calibration windows per block forward.
        seed: seed of the approximate-median sample.
    """

    method: str = "dlp"
    criterion: str = "wanda"
    sparsity: float = 0.7
    alpha: float = 0.15
    stat: str = "median"
    nm: str | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    median_approx: bool = False
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    device: str = "cpu"
    batch_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("dlp", "owl", "uniform"):
            raise ValueError(f"prune.method must be dlp|owl|uniform, got {self.method!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"prune.criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.stat not in STATS:
            raise ValueError(f"prune.stat must be one of {STATS}, got {self.stat!r}")
        if not 0.01 <= self.sparsity <= 0.99:
            raise ValueError(f"prune.sparsity must be in [0.01, 0.99], got {self.sparsity}")
        if self.batch_size < 1:
            raise ValueError("prune.batch_size must be >= 1")
        parse_nm(self.nm)


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


def _host_device(layout: DecoderLayout) -> torch.device:
    return next(layout.layers[0].parameters()).device


def _sync(device: torch.device | str) -> None:
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
    host = _host_device(layout)
    parts = [m for m in layout.trunk.children() if m is not layout.layers]
    for m in parts:
        m.to(device)
    try:
        yield
    finally:
        for m in parts:
            m.to(host)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
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
            for batch in _batches(ids, batch_size):
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
def _on_device(module: nn.Module, device: torch.device | str, host: torch.device) -> Iterator[nn.Module]:
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


# ----------------------------------------------------------------------------- pass A


def _score_stream(linears: dict[str, nn.Linear], acc: dict[str, torch.Tensor], n_samples: int):
    """Zero-arg callable yielding each matrix's Wanda scores ``|W| · sqrt(acc / N)``."""
    return lambda: (wanda_scores(lin.weight, acc[name] / n_samples) for name, lin in linears.items())


@torch.no_grad()
def signal_pass(model: nn.Module, calib_ids: torch.Tensor, cfg: PruneSettings) -> list[dict[str, float]]:
    """Pass A: dense propagation; per block the pooled Wanda score statistics.

    Modifies no weight and leaves no hook behind.

    Returns:
        Per block ``{"mean", "median", "outlier_ratio", "numel"}``.
    """
    layout = find_layout(model)
    host = _host_device(layout)
    with _eval_mode(model):
        inputs = capture_inputs(model, layout, calib_ids, cfg.device, cfg.batch_size)
        out = []
        for block in layout.layers:
            with _on_device(block, cfg.device, host):
                acc, outs = collect_sq_norms(block, inputs)
                stream = _score_stream(block_linears(block), acc, inputs.n_samples)
                out.append(block_score_stats(stream, outlier_m=cfg.owl_m, median=True,
                                             median_approx=cfg.median_approx, seed=cfg.seed))
            inputs.hidden = outs
    return out


# ----------------------------------------------------------------------------- pass B


@torch.no_grad()
def prune_linear_(lin: nn.Linear, sparsity: float, cfg: PruneSettings, acc: torch.Tensor | None = None,
                  H: torch.Tensor | None = None) -> torch.Tensor:
    """Prune one Linear in place with ``cfg.criterion`` at ``sparsity`` (or ``cfg.nm``).

    Returns:
        Bool mask ``[out, in]``, True = pruned.
    """
    nm = parse_nm(cfg.nm)
    W = lin.weight
    if cfg.criterion == "sparsegpt":
        return sparsegpt_prune_(W, H, sparsity, cfg.sparsegpt_blocksize, cfg.sparsegpt_percdamp, nm)
    if cfg.criterion == "wanda":
        scores = wanda_scores(W, acc)  # [out, in]
        mask = nm_mask(scores, *nm) if nm else lowest_k_per_row(scores, exact_count(sparsity, W.shape[1]))
    else:
        mask = nm_mask(W.detach().float().abs(), *nm) if nm else magnitude_mask(W, sparsity)
    W.data.masked_fill_(mask, 0)
    return mask


def _zero_fraction(t: torch.Tensor) -> float:
    return float((t == 0).sum().item()) / t.numel()


@torch.no_grad()
def prune_pass(model: nn.Module, calib_ids: torch.Tensor, sparsities: Sequence[float],
               cfg: PruneSettings) -> list[dict[str, float]]:
    """Pass B: prune block by block, propagating the calibration data through pruned blocks.

    Returns:
        Per block ``{qualified matrix name: achieved sparsity}``.
    """
    layout = find_layout(model)
    host = _host_device(layout)
    achieved = []
    with _eval_mode(model):
        inputs = capture_inputs(model, layout, calib_ids, cfg.device, cfg.batch_size)
        for l, block in enumerate(layout.layers):
            with _on_device(block, cfg.device, host):
                linears = block_linears(block)
                acc, H = {}, {}
                if cfg.criterion == "wanda":
                    acc, _ = collect_sq_norms(block, inputs)
                elif cfg.criterion == "sparsegpt":
                    H = collect_hessians(block, inputs)
                for name, lin in linears.items():
                    prune_linear_(lin, sparsities[l], cfg, acc=acc.get(name), H=H.get(name))
                achieved.append({f"{layout.prefix}.{l}.{n}": _zero_fraction(lin.weight) for n, lin in linears.items()})
                inputs.hidden = run_block(block, inputs)
            log.info("block %d pruned at %.4f", l, sparsities[l])
    return achieved


# ----------------------------------------------------------------------------- entry point


def _unique_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates tied weights


def _effective(cfg: PruneSettings) -> tuple[PruneSettings, list[str]]:
    """Apply the N:M override (uniform, s = N/M) and return the warnings it raised."""
    nm = parse_nm(cfg.nm)
    if nm is None:
        return cfg, []
    s = nm[0] / nm[1]
    notes = []
    if cfg.method != "uniform" or abs(cfg.sparsity - s) > 1e-12:
        notes.append(f"prune.nm={cfg.nm}: method {cfg.method!r} and sparsity {cfg.sparsity} overridden by uniform {s}")
        warnings.warn(notes[-1])
    return PruneSettings(**{**asdict(cfg), "method": "uniform", "sparsity": s}), notes


def prune_model(model: nn.Module, calib_ids: torch.Tensor, cfg: PruneSettings) -> dict:
    """Prune ``model`` in place: Pass A (signal), allocation, Pass B (prune).

    Args:
        model: HF causal LM, weights on the host (CPU); only one block at a time moves to
            ``cfg.device``.
        calib_ids: ``[N, T]`` calibration windows (see
            :func:`effsft.prune.calibration.sample_calibration`).
        cfg: :class:`PruneSettings`.

    Returns:
        Report dict: settings, per-block ``S_l``/``D_l``/``r_l``/target ``s_l``/achieved
        (also per matrix)/``P_l``/clamped, the shift ``c``, global target and achieved
        sparsity (prunable set and all parameters), timings.
    """
    eff, notes = _effective(cfg)
    layout = find_layout(model)
    blocks = list(layout.layers)
    params = [sum(l.weight.numel() for l in block_linears(b).values()) for b in blocks]
    timings = {}
    t0 = time.perf_counter()

    stats: list[dict] = [{} for _ in blocks]
    if eff.method != "uniform":  # uniform needs no signal: skipping Pass A saves a forward per block
        stats = signal_pass(model, calib_ids, eff)
    _sync(eff.device)
    timings["pass_a_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    key = eff.stat
    alloc = allocate(eff.method, eff.sparsity, n_blocks=len(blocks),
                     block_stats=[s[key] for s in stats] if eff.method == "dlp" else None,
                     outlier_ratios=[s["outlier_ratio"] for s in stats] if eff.method == "owl" else None,
                     alpha=eff.alpha, lam=eff.owl_lambda, block_params=params)
    timings["allocation_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    per_matrix = prune_pass(model, calib_ids, alloc.sparsities, eff)
    _sync(eff.device)
    timings["pass_b_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    report_blocks = []
    pruned = 0.0
    for l, mats in enumerate(per_matrix):
        sizes = {n: model.get_parameter(n + ".weight").numel() for n in mats}
        zeros = sum(mats[n] * sizes[n] for n in mats)
        pruned += zeros
        report_blocks.append({
            "index": l,
            "S_mean": stats[l].get("mean"), "S_median": stats[l].get("median"),
            "D": stats[l].get("outlier_ratio"),
            "r": alloc.raw[l], "target": alloc.sparsities[l], "achieved": zeros / params[l],
            "params": params[l], "clamped": alloc.clamped[l], "matrices": mats,
        })
    total = _unique_param_count(model)
    return {
        "settings": asdict(cfg), "effective": {"method": eff.method, "sparsity": eff.sparsity, "nm": eff.nm},
        "n_calib": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "n_blocks": len(blocks),
        "shift_c": alloc.shift, "blocks": report_blocks,
        "global": {
            "target": eff.sparsity, "allocated": alloc.achieved,
            "achieved_prunable": pruned / sum(params), "prunable_params": sum(params),
            "target_all_params": eff.sparsity * sum(params) / total,
            "achieved_all_params": pruned / total, "total_params": total,
        },
        "timings": timings, "warnings": notes,
    }


# ----------------------------------------------------------------------------- streaming eval


@torch.no_grad()
def _stream_through_blocks(model: nn.Module, layout: DecoderLayout, ids: torch.Tensor,
                           device: torch.device | str, batch_size: int) -> BlockInputs:
    host = _host_device(layout)
    inputs = capture_inputs(model, layout, ids, device, batch_size)
    for block in layout.layers:
        with _on_device(block, device, host):
            inputs.hidden = run_block(block, inputs)
    return inputs


@torch.no_grad()
def _head_outputs(layout: DecoderLayout, hidden: list[torch.Tensor], device: torch.device | str,
                  fn: Callable[[torch.Tensor], None]) -> None:
    """Apply final modules + lm_head to each micro-batch and hand ``logits [b, T, V]`` to ``fn``."""
    host = _host_device(layout)
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
    with _eval_mode(model):
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
    targets = iter(list(_batches(ids_windows, batch_size)))

    def consume(logits: torch.Tensor) -> None:  # logits [b, T, V]
        y = next(targets).to(logits.device)  # [b, T]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), reduction="sum")
        nll[0] += float(loss.item())
        count[0] += y[:, 1:].numel()

    with _eval_mode(model):
        inputs = _stream_through_blocks(model, layout, ids_windows, device, batch_size)
        _head_outputs(layout, inputs.hidden, device, consume)
    return math.exp(nll[0] / count[0])
