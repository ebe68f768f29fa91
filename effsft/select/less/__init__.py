"""LESS: gradient-based selection with Adam-preconditioned LoRA gradient features.

Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning"
(https://github.com/princeton-nlp/LESS); spec ``data_selection.md`` §2.2. Steps:

1. **Warm-up** (:func:`less_warmup`): LoRA training on a seeded 5% of the pool for N epochs,
   saving after every epoch the LoRA weights, the AdamW moments of every LoRA parameter and
   the epoch's mean learning rate.
2. **Training-row features** (paper Eq. 2 / §3): per-example LoRA gradient g of the
   response-only loss, turned into the Adam update direction with the checkpoint's moments,
   ``m' = β1·m + (1−β1)·g``, ``v' = β2·v + (1−β2)·g²``, ``Γ = m' / √(v' + ε)``
   (:func:`adam_features`; no bias correction, as the reference: it rescales a checkpoint's
   features uniformly, which the cosine ignores up to ε).
3. **Target features**: plain gradients of the target rows, grouped into subtasks.
4. **Projection**: a Rademacher JL map to d dimensions (:class:`RademacherProjector`), built
   block by block from a seed so that every process builds the same matrix, then L2
   normalisation.
5. **Score** (paper Eq. 3): ``max_s mean_{z'∈s} Σ_i η̄_i · cos(Γ_i(z), g_i(z'))`` with η̄_i
   the i-th checkpoint's mean learning rate normalised to sum to 1 (:func:`less_scores`).

The scoring is distributed per checkpoint: an actor that holds checkpoint i returns, for each
training row, the mean cosine with each subtask (:func:`subtask_cosines`, which only needs the
subtask means of the normalised target features), and the driver combines the checkpoints
(:func:`combine_checkpoints`).

Scalable warm-up: :func:`less_warmup` is a plain single-process torch loop (one GPU or CPU),
enough for a 5% slice of the pool with LoRA. (``effsft sft`` with ``lora.enabled=true`` trains
the same adapters on many workers, but its DeepSpeed checkpoints do not carry per-epoch
mean learning rates and shard the moments, so they are not read here.)

Modules: ``features`` (projector, Γ, η̄, the subtask combination), ``gradients`` (encoding,
per-example gradients, projected features), ``warmup`` (LoRA, warm-up checkpoints,
:func:`prepare_checkpoints`): no Ray in these three; this package re-exports their public
names. ``stage`` is the select job's LESS stage (the cached warm-up as a Ray task, then one
scorer pool per checkpoint); import it from ``effsft.select.less.stage``.
"""
from effsft.select.less.features import (PROJECTOR_VERSION, RademacherProjector, adam_features,
                                         combine_checkpoints, eta_bar, less_scores, normalize_rows,
                                         subtask_cosines, subtask_means)
from effsft.select.less.gradients import (encode_rows, gradient_features, per_example_grads, response_loss,
                                          trainable_names)
from effsft.select.less.warmup import (Checkpoint, LoraSettings, WarmupSettings, attach_lora, less_warmup,
                                       load_checkpoint, load_target_means, prepare_checkpoints)

__all__ = [
    "PROJECTOR_VERSION",
    "RademacherProjector",
    "adam_features",
    "normalize_rows",
    "eta_bar",
    "subtask_means",
    "subtask_cosines",
    "combine_checkpoints",
    "less_scores",
    "encode_rows",
    "trainable_names",
    "response_loss",
    "per_example_grads",
    "attach_lora",
    "LoraSettings",
    "WarmupSettings",
    "Checkpoint",
    "less_warmup",
    "load_checkpoint",
    "gradient_features",
    "prepare_checkpoints",
    "load_target_means",
]
