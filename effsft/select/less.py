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
(:func:`combine_checkpoints`). No Ray in this module.

Scalable warm-up: :func:`less_warmup` is a plain single-process torch loop (one GPU or CPU),
enough for a 5% slice of the pool with LoRA. (``effsft sft`` with ``lora.enabled=true`` trains
the same adapters on many workers, but its DeepSpeed checkpoints do not carry per-epoch
mean learning rates and shard the moments, so they are not read here.)
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from effsft.corpus.tokenize import IGNORE_INDEX
from effsft.select.lm_scores import STATUS_OK, encode_pairs, pad_right

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

PROJECTOR_VERSION = "rademacher-blake2b-v1"
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------- projection
class RademacherProjector:
    """x ↦ x·R/√d with R ∈ {−1, +1}^{P×d}, generated in row blocks from a seed.

    Block b (rows ``b·block_rows …``) comes from its own ``torch.Generator`` seeded with
    BLAKE2b(version‖seed‖b), so any process — and any split of the P parameters into blocks —
    builds the same matrix without storing the dense P×d matrix. With the 1/√d scale,
    E‖xR/√d‖² = ‖x‖² (Johnson–Lindenstrauss; Achlioptas 2003).

    Args:
        n_params: P, the length of the vectors to project.
        dim: d, the projected dimension (LESS: 8192).
        seed: projector seed (LESS: 0).
        block_rows: rows of R generated at a time.
        cache_bytes: keep generated blocks in memory while their total stays under this.
    """

    def __init__(self, n_params: int, dim: int = 8192, seed: int = 0, block_rows: int = 4096,
                 cache_bytes: int = 256 << 20):
        if n_params < 1 or dim < 1 or block_rows < 1:
            raise ValueError("n_params, dim and block_rows must be positive")
        self.n_params, self.dim, self.seed, self.block_rows = int(n_params), int(dim), int(seed), int(block_rows)
        self.n_blocks = math.ceil(self.n_params / self.block_rows)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_ok = self.n_params * self.dim * 4 <= cache_bytes

    def block_range(self, b: int) -> tuple[int, int]:
        lo = b * self.block_rows
        return lo, min(self.n_params, lo + self.block_rows)

    def _block_seed(self, b: int) -> int:
        h = hashlib.blake2b(f"{PROJECTOR_VERSION}|{self.seed}|{b}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") & ((1 << 63) - 1)

    def block(self, b: int) -> torch.Tensor:
        """Rows ``block_range(b)`` of R as ±1 fp32 on CPU. Returns [rows_b, d]."""
        if b in self._cache:
            return self._cache[b]
        lo, hi = self.block_range(b)
        g = torch.Generator(device="cpu").manual_seed(self._block_seed(b))
        r = torch.randint(0, 2, (hi - lo, self.dim), generator=g, dtype=torch.int8)
        r = r.to(torch.float32).mul_(2).sub_(1)  # {0,1} -> {-1,+1}
        if self._cache_ok:
            self._cache[b] = r
        return r

    def project_block(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Partial projection of the parameter slice ``block_range(b)``: [N, rows_b] -> [N, d].

        Summing this over every block equals :meth:`project` (what a distributed caller does).
        """
        return x.float() @ self.block(b).to(x.device) / math.sqrt(self.dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[N, P] -> [N, d] fp32."""
        if x.shape[-1] != self.n_params:
            raise ValueError(f"projector built for {self.n_params} params, got vectors of {x.shape[-1]}")
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        for b in range(self.n_blocks):
            lo, hi = self.block_range(b)
            out += self.project_block(x[:, lo:hi], b)
        return out

    @property
    def checksum(self) -> str:
        """BLAKE2b of the construction (version, P, d, seed, block size) and of the first and
        last blocks' bits: equal checksums mean equal matrices, and a different RNG stream
        on another machine shows up (hashing all P·d entries would cost a full generation)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([PROJECTOR_VERSION, self.n_params, self.dim, self.seed, self.block_rows]).encode())
        for b in sorted({0, self.n_blocks - 1}):
            h.update(self.block(b).to(torch.int8).numpy().tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- features
def adam_features(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  beta1: float = BETA1, beta2: float = BETA2, eps: float = ADAM_EPS) -> torch.Tensor:
    """Γ = m'/√(v'+ε), m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g² (LESS Eq. 2, no bias correction).

    Args:
        g: [N, P] per-example gradients.
        exp_avg / exp_avg_sq: [P] AdamW moments m, v of the checkpoint.
    Returns:
        [N, P] fp32.
    """
    g = g.float()
    m = beta1 * exp_avg.float().to(g.device) + (1 - beta1) * g
    v = beta2 * exp_avg_sq.float().to(g.device) + (1 - beta2) * g * g
    return m / torch.sqrt(v + eps)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation ([N, d]); a zero row stays zero (cosine 0 with anything)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def eta_bar(mean_lrs: Sequence[float]) -> np.ndarray:
    """η̄_i = η_i / Σ_j η_j: the checkpoints' mean learning rates normalised to sum to 1."""
    lr = np.asarray(mean_lrs, np.float64)
    if lr.ndim != 1 or not len(lr) or (lr < 0).any() or lr.sum() <= 0:
        raise ValueError(f"mean learning rates must be non-negative with a positive sum, got {mean_lrs}")
    return lr / lr.sum()


def subtask_means(target: np.ndarray, groups: Sequence) -> tuple[list[str], np.ndarray]:
    """Mean target feature per subtask, subtasks in sorted name order.

    Why means suffice: mean_{z'∈s} cos(Γ, g(z')) = Γ̂ · mean_{z'∈s} ĝ(z') for unit vectors.

    Args:
        target: [M, d] L2-normalised target features.
        groups: M subtask labels.
    Returns:
        (names [S], means [S, d] fp64).
    """
    labels = np.asarray([str(x) for x in groups])
    names = sorted(set(labels.tolist()))
    t = np.asarray(target, np.float64)
    return names, np.stack([t[labels == s].mean(0) for s in names])


def subtask_cosines(train: np.ndarray, means: np.ndarray) -> np.ndarray:
    """One checkpoint's mean cosine of each training row with each subtask.

    Args:
        train: [N, d] L2-normalised Γ features.
        means: [S, d] from :func:`subtask_means`.
    Returns:
        [N, S] fp64.
    """
    return np.asarray(train, np.float64) @ np.asarray(means, np.float64).T


def combine_checkpoints(per_ckpt: Sequence[np.ndarray], mean_lrs: Sequence[float]) -> np.ndarray:
    """score = max_s Σ_i η̄_i · C_i[:, s] (LESS Eq. 3, then the max over subtasks).

    Args:
        per_ckpt: K arrays [N, S] of :func:`subtask_cosines` (NaN rows stay NaN).
        mean_lrs: K mean learning rates.
    Returns:
        [N] fp64.
    """
    w = eta_bar(mean_lrs)
    if len(per_ckpt) != len(w):
        raise ValueError(f"{len(per_ckpt)} checkpoints but {len(w)} learning rates")
    total = sum(wi * np.asarray(c, np.float64) for wi, c in zip(w, per_ckpt))  # [N, S]
    return total.max(axis=1)


def less_scores(train: Sequence[np.ndarray], target: Sequence[np.ndarray], groups: Sequence,
                mean_lrs: Sequence[float]) -> np.ndarray:
    """The whole score in one process from K checkpoints' normalised features.

    Args:
        train: K arrays [N, d] (normalised Γ_i).
        target: K arrays [M, d] (normalised g_i of the target rows).
        groups: M subtask labels.
        mean_lrs: K mean learning rates.
    Returns:
        [N] fp64.
    """
    per = [subtask_cosines(tr, subtask_means(tg, groups)[1]) for tr, tg in zip(train, target)]
    return combine_checkpoints(per, mean_lrs)


# ----------------------------------------------------------------------------- gradients
def encode_rows(tokenizer, messages_list, max_len: int) -> tuple[list, list[str]]:
    """Token ids and response-only labels per row (the LM scorers' encoding: the template rule).

    Returns:
        (rows, status): ``rows[i]`` is ``(ids, labels)`` (lists; labels −100 on the prompt)
        or None when ``status[i]`` is not ``ok``.
    """
    rows, status = [], []
    for e in encode_pairs(tokenizer, messages_list, max_len):
        status.append(e.status)
        rows.append((e.prompt_ids + e.answer_ids, [IGNORE_INDEX] * len(e.prompt_ids) + e.answer_ids)
                    if e.status == STATUS_OK else None)
    return rows, status


def _collate(rows: Sequence[tuple[list, list]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, T], labels [B, T] with −100 on padding, attention_mask [B, T])."""
    ids, mask = pad_right([r[0] for r in rows], pad_id)
    labels, _ = pad_right([r[1] for r in rows], IGNORE_INDEX)
    return ids, labels, mask


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require grad (the LoRA adapters), in module order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL over response tokens, the token at t predicted from logits at t−1.

    Args:
        logits: [B, T, V]; labels: [B, T] with −100 where not trained.
    Returns:
        [B] fp32.
    """
    tgt = labels[:, 1:]  # [B, T-1]
    keep = tgt != IGNORE_INDEX
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt.clamp_min(0), reduction="none")  # [B, T-1]
    return (nll * keep).sum(1) / keep.sum(1).clamp_min(1)


def per_example_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                      names: Sequence[str], method: str = "vmap") -> torch.Tensor:
    """Gradient of each row's response loss w.r.t. the parameters ``names``, flattened.

    Rows are right-padded and run without an attention mask: with causal attention the padding
    after a row's last token cannot change its real positions, and padding carries no label.

    Args:
        model: causal LM (eval mode: no dropout).
        ids / labels: [B, T].
        names: trainable parameter names (:func:`trainable_names`), the flattening order.
        method: ``vmap`` (torch.func, one batched pass) or ``loop`` (one backward per row).
    Returns:
        [B, P] fp32, P = total size of ``names``.
    """
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    theta = {n: params[n].detach() for n in names}

    def loss_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": x[None], "use_cache": False}).logits  # [1, T, V]
        return response_loss(logits, y[None])[0]

    if method == "vmap":
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, ids, labels)  # {name: [B, ...]}
        return torch.cat([g[n].reshape(ids.shape[0], -1).float() for n in names], 1)
    if method == "loop":
        out = []
        for x, y in zip(ids, labels):
            g = grad(loss_one)(theta, x, y)
            out.append(torch.cat([g[n].reshape(-1).float() for n in names]))
        return torch.stack(out)
    raise ValueError(f"method must be vmap|loop, got {method!r}")


# ----------------------------------------------------------------------------- LoRA + warm-up
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


def gradient_features(model: torch.nn.Module, tokenizer, messages_list, projector: RademacherProjector,
                      ckpt: Checkpoint, adam: bool, max_len: int = 2048, micro_batch_size: int = 8,
                      method: str = "vmap") -> tuple[np.ndarray, list[str]]:
    """Normalised projected features of rows at one checkpoint.

    Args:
        model / ckpt: from :func:`load_checkpoint`.
        projector: built for P = ckpt's parameter count.
        adam: True for training rows (Γ with the checkpoint's moments), False for target rows
            (plain gradients).
        max_len / micro_batch_size: truncation and rows per gradient pass.
        method: :func:`per_example_grads` method.
    Returns:
        (features [N, d] fp32 — NaN rows where status is not ok —, status [N]).
    """
    rows, status = encode_rows(tokenizer, messages_list, max_len)
    feats = np.full((len(rows), projector.dim), np.nan, np.float32)
    ok = [i for i, r in enumerate(rows) if r is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ok.sort(key=lambda i: -len(rows[i][0]))  # length-sorted micro-batches: less padding
    for b0 in range(0, len(ok), micro_batch_size):
        idx = ok[b0:b0 + micro_batch_size]
        ids, labels, _ = _collate([rows[i] for i in idx], pad_id)
        g = per_example_grads(model, ids.to(device), labels.to(device), ckpt.names, method)  # [b, P]
        if adam:
            g = adam_features(g, ckpt.exp_avg, ckpt.exp_avg_sq)
        feats[idx] = normalize_rows(projector.project(g)).cpu().numpy()
    return feats, status


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
