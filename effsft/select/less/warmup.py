"""LESS warm-up: LoRA adapters, the per-epoch warm-up checkpoints (adapters, AdamW moments, mean
lr) and :func:`prepare_checkpoints`, the warm-up plus target features a select job runs once. No Ray."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from effsft.corpus.tokenize import IGNORE_INDEX
from effsft.select.less.features import ADAM_EPS, BETA1, BETA2, RademacherProjector, subtask_means
from effsft.select.less.gradients import _collate, encode_rows, gradient_features, response_loss, trainable_names
from effsft.select.lm_scores import STATUS_OK


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters of the warm-up (LESS: r 128, α 512 on q/k/v/o)."""

    r: int = 128
    alpha: float = 512
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class WarmupSettings:
    """Warm-up training (LESS: 4 epochs, lr 2e-5 linear with 3% warm-up, batch 32, max_len 2048)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    batch_size: int = 32
    micro_batch_size: int = 8
    max_len: int = 2048
    weight_decay: float = 0.0
    seed: int = 0


def attach_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """Wrap an HF causal LM with peft LoRA adapters (no dropout: gradients must be deterministic)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


@dataclass
class Checkpoint:
    """One warm-up epoch: LoRA weights, flattened AdamW moments and the epoch's mean lr."""

    path: Path
    epoch: int
    mean_lr: float
    names: list[str]
    exp_avg: torch.Tensor       # [P]
    exp_avg_sq: torch.Tensor    # [P]


def _save_checkpoint(path: Path, model, opt, names: list[str], epoch: int, mean_lr: float, steps: int) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    save_file({n: params[n].detach().float().cpu().contiguous() for n in names}, str(path / "adapter.safetensors"))
    moments = {}
    for n in names:
        st = opt.state.get(params[n], {})
        for k in ("exp_avg", "exp_avg_sq"):
            t = st[k] if k in st else torch.zeros_like(params[n])  # a parameter never stepped
            moments[f"{k}/{n}"] = t.detach().float().cpu().contiguous()
    save_file(moments, str(path / "moments.safetensors"))
    (path / "info.json").write_text(json.dumps({"epoch": epoch, "mean_lr": mean_lr, "steps": steps,
                                                "names": names}, indent=1))


def less_warmup(model: torch.nn.Module, tokenizer, messages_list, out_dir: str | Path,
                s: WarmupSettings = WarmupSettings(), log_step=None) -> list[Path]:
    """LoRA warm-up on ``messages_list``; one checkpoint directory per epoch.

    AdamW (β = 0.9, 0.999, ε = 1e-8) on the LoRA parameters, linear decay after a linear
    warm-up of ``warmup_ratio`` of the steps (the reference's HF Trainer schedule). Rows are
    shuffled per epoch with ``seed``. Each ``out_dir/epoch-<i>/`` holds ``adapter.safetensors``,
    ``moments.safetensors`` (``exp_avg/<name>``, ``exp_avg_sq/<name>``) and ``info.json``
    (epoch, mean lr of its steps, step count, parameter names).

    Args:
        model: base HF causal LM (fp32 recommended), on its device; LoRA is attached here.
        tokenizer: its tokenizer.
        messages_list: canonical conversations of the warm-up slice.
        out_dir: where to write the checkpoints.
        s: settings.
        log_step: called with each step's metrics row (``step``, ``epoch``, ``loss``, ``lr``,
            ``tokens``, ``tokens_per_s``), e.g. a :class:`~effsft.train.tracking.Tracker`'s ``log``.
    Returns:
        The checkpoint directories, one per epoch.
    """
    import time

    from effsft.train.schedule import lr_factor

    torch.manual_seed(s.seed)
    model = attach_lora(model, s.lora)
    model.train()
    names = trainable_names(model)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=s.lr, betas=(BETA1, BETA2), eps=ADAM_EPS,
                            weight_decay=s.weight_decay)
    rows = [r for r in encode_rows(tokenizer, messages_list, s.max_len)[0] if r is not None]
    if not rows:
        raise ValueError("LESS warm-up: no trainable rows")
    steps_per_epoch = math.ceil(len(rows) / s.batch_size)
    total = steps_per_epoch * s.epochs
    warm = math.ceil(s.warmup_ratio * total)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(s.seed)
    out, step = [], 0
    for epoch in range(s.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        lrs = []
        for b0 in range(0, len(rows), s.batch_size):
            batch = [rows[i] for i in order[b0:b0 + s.batch_size]]
            lr = s.lr * lr_factor(step, warm, total, "linear")
            for grp in opt.param_groups:
                grp["lr"] = lr
            n_tok = sum(sum(1 for y in r[1][1:] if y != IGNORE_INDEX) for r in batch)
            t0, loss_sum = time.perf_counter(), 0.0
            for m0 in range(0, len(batch), s.micro_batch_size):
                ids, labels, mask = (t.to(device) for t in _collate(batch[m0:m0 + s.micro_batch_size], pad_id))
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [b, T, V]
                keep = (labels[:, 1:] != IGNORE_INDEX).sum(1)
                # token mean over the whole batch (HF Trainer's loss), split over micro-batches
                loss = (response_loss(logits, labels) * keep).sum().div(max(n_tok, 1))
                loss.backward()
                loss_sum += float(loss.detach())
            opt.step()
            opt.zero_grad(set_to_none=True)
            lrs.append(lr)
            step += 1
            if log_step is not None:
                dt = time.perf_counter() - t0
                log_step({"step": step, "epoch": epoch, "loss": loss_sum, "lr": lr, "tokens": n_tok,
                          "tokens_per_s": n_tok / dt if dt > 0 else 0.0})
        path = Path(out_dir) / f"epoch-{epoch}"
        _save_checkpoint(path, model, opt, names, epoch, float(np.mean(lrs)), step)
        out.append(path)
    return out


def load_checkpoint(model: torch.nn.Module, path: str | Path, lora: LoraSettings) -> tuple[torch.nn.Module, Checkpoint]:
    """Attach LoRA to a base model, load a warm-up checkpoint's adapters and its moments.

    Returns:
        (peft model in eval mode with only the adapters trainable, :class:`Checkpoint`).
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = json.loads((path / "info.json").read_text())
    model = attach_lora(model, lora).eval()
    names = trainable_names(model)
    if names != info["names"]:
        raise ValueError(f"{path}: LoRA parameters differ from the checkpoint's (other lora settings?)")
    state = load_file(str(path / "adapter.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(state[n])
    mom = load_file(str(path / "moments.safetensors"))
    flat = {k: torch.cat([mom[f"{k}/{n}"].reshape(-1) for n in names]) for k in ("exp_avg", "exp_avg_sq")}
    return model, Checkpoint(path, info["epoch"], info["mean_lr"], names, flat["exp_avg"], flat["exp_avg_sq"])


# ----------------------------------------------------------------------------- warm-up stage
TARGET_FILE = "target.npz"


def prepare_checkpoints(model_path: str, warmup_messages, target_messages, target_groups: Sequence,
                        out_dir: str | Path, s: WarmupSettings, proj_dim: int = 8192, proj_seed: int = 0,
                        device: str = "cpu", method: str = "vmap", trust_remote_code: bool = False,
                        template: str = "auto", tracking=None) -> dict:
    """Warm-up, then the target features of every checkpoint (what the select job runs once).

    Writes the :func:`less_warmup` checkpoints under ``out_dir`` and, in each, ``target.npz``
    with ``feats`` [M', d] (normalised projected plain gradients of the M' target rows that
    could be encoded) and ``groups`` [M'] (their subtask labels).

    Returns:
        ``{"checkpoints": [{"path", "epoch", "mean_lr"}], "n_params", "projector_checksum",
        "target_rows", "subtasks"}`` (JSON-able).
    """
    from effsft.models.loading import load_model, load_tokenizer

    def base():
        return load_model(model_path, dtype="float32", device=device, trust_remote_code=trust_remote_code)

    from effsft.train.tracking import Tracker, TrackingSpec

    tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, template=template)
    tracker = Tracker.open(tracking or TrackingSpec(), out_dir)  # <out_dir>/tb: the warm-up's loss, lr, tokens/s
    try:
        paths = less_warmup(base(), tok, warmup_messages, out_dir, s, log_step=tracker.log)
    finally:
        tracker.close()
    info: dict = {"checkpoints": []}
    groups = np.asarray([str(x) for x in target_groups])
    for path in paths:
        model, ck = load_checkpoint(base(), path, s.lora)
        proj = RademacherProjector(len(ck.exp_avg), proj_dim, proj_seed)
        feats, status = gradient_features(model, tok, target_messages, proj, ck, adam=False, max_len=s.max_len,
                                          micro_batch_size=s.micro_batch_size, method=method)
        ok = np.asarray(status) == STATUS_OK
        if not ok.any():
            raise ValueError("LESS: no target row could be encoded")
        np.savez(path / TARGET_FILE, feats=feats[ok], groups=groups[ok])
        info["checkpoints"].append({"path": str(path), "epoch": ck.epoch, "mean_lr": ck.mean_lr})
        info.update(n_params=len(ck.exp_avg), projector_checksum=proj.checksum, target_rows=int(ok.sum()),
                    subtasks=sorted(set(groups[ok].tolist())))
    return info


def load_target_means(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Subtask names and mean target features [S, d] of one checkpoint's ``target.npz``."""
    z = np.load(Path(path) / TARGET_FILE)
    return subtask_means(z["feats"], z["groups"].tolist())
