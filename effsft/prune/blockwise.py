"""Block-by-block DLP/OWL/uniform pruning of a Hugging Face causal LM (no Ray).

Only the current decoder block and its input/output activations sit on ``device``; the
rest of the model stays where it is (host RAM). Works for decoders whose blocks live in one
``nn.ModuleList`` (Llama, Qwen2, Mistral, OPT, ...).

Pipeline (spec ``dlp.md`` §2; the block machinery is :mod:`effsft.prune.blocks`, the streamed
perplexity :mod:`effsft.prune.streaming`):
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

import logging
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from effsft.prune.allocate import allocate
from effsft.prune.blocks import (
    block_linears,
    capture_inputs,
    collect_hessians,
    collect_sq_norms,
    eval_mode,
    find_layout,
    host_device,
    on_device,
    run_block,
    sync,
)
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
    host = host_device(layout)
    with eval_mode(model):
        inputs = capture_inputs(model, layout, calib_ids, cfg.device, cfg.batch_size)
        out = []
        for block in layout.layers:
            with on_device(block, cfg.device, host):
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
    host = host_device(layout)
    achieved = []
    with eval_mode(model):
        inputs = capture_inputs(model, layout, calib_ids, cfg.device, cfg.batch_size)
        for l, block in enumerate(layout.layers):
            with on_device(block, cfg.device, host):
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
    sync(eff.device)
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
    sync(eff.device)
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
