"""Training faults the shared loop survives: non-finite losses, and a corrupt latest checkpoint.

**NaN/Inf loss** (``train.on_nan: skip|stop``, ``train.max_nan_steps``): :class:`NanGuard`
watches every micro-batch loss and the gradients before the optimizer update. A step whose loss
or gradients are non-finite on *any* rank (a flag all-reduced with MAX, so every rank takes the
same decision) applies no update: the torch optimizer's ``step`` is not called (ZeRO-1..3 skip
such a step themselves, their global grad norm being non-finite), DeepSpeed counts it in
``skipped_steps`` and holds the LR schedule; gradients are cleared as after any step. ``skip``
goes on, and fails once more than ``max_nan_steps`` steps were skipped in a run; ``stop`` fails
at the first. The metrics row gets ``nan_skipped`` (0/1) and ``nan_steps_skipped``; rank 0's
summary (and so the manifest) the total. ``fault.nan_at_steps`` (tests) makes the loss of those
1-based optimizer steps NaN.

**Corrupt latest checkpoint**: :func:`restore_latest_readable` loads the checkpoint Ray Train
hands back and, if any rank cannot load its part (a truncated file), falls back to the previous
checkpoints of the run (the sibling ``checkpoint_*`` directories of the run's storage,
newest step first), with a warning; every rank agrees on the one it uses.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger("effsft.train")


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps with a non-finite loss or gradients."""


def _all_reduce_max(flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _all_reduce_min(flag: bool) -> bool:
    return not _all_reduce_max(not flag)


def _nonfinite_grads(optimizer) -> bool:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return True
    return False


class NanGuard:
    """Skip (or stop at) optimizer steps with a non-finite loss or gradients; see the module doc."""

    def __init__(self, on_nan: str = "skip", max_nan_steps: int = 10, nan_at_steps: Sequence[int] = ()):
        if on_nan not in ("skip", "stop"):
            raise ValueError(f"train.on_nan: {on_nan!r} is not skip|stop")
        self.on_nan, self.max_nan_steps = on_nan, max_nan_steps
        self.nan_at_steps = set(nan_at_steps)
        self.skipped = 0
        self._local_bad = False
        self._engine_skipped = 0

    # -- hooks ---------------------------------------------------------------------------
    def wrap_loss(self, loss_fn):
        """The loss hook, recording non-finite losses (and injecting NaN at ``nan_at_steps``)."""
        def guarded(model, batch, ctx):
            loss, metrics = loss_fn(model, batch, ctx)
            if ctx.step + 1 in self.nan_at_steps:
                loss = loss * float("nan")
            if not torch.isfinite(loss.detach()).all():
                self._local_bad = True
            return loss, metrics

        return guarded

    def attach(self, engine) -> "NanGuard":
        """Guard the torch optimizer's ``step`` inside the DeepSpeed engine."""
        outer = engine.optimizer
        inner = getattr(outer, "optimizer", outer)  # ZeRO wraps the torch optimizer
        original = inner.step

        @functools.wraps(original)  # keeps the LR scheduler's marker on the wrapped step
        def step(*args, **kwargs):
            bad = _all_reduce_max(self._local_bad or _nonfinite_grads(inner))
            if outer is inner:  # ZeRO-0: DeepSpeed reads `overflow` to skip the LR step and count it
                inner.overflow = bad
            if bad:
                return None
            return original(*args, **kwargs)

        inner.step = step
        self._engine_skipped = int(getattr(engine, "skipped_steps", 0))
        return self

    def end_step(self, engine, step: int) -> dict:
        """After optimizer step ``step`` (1-based): count a skipped step, raise past the limit."""
        now = int(getattr(engine, "skipped_steps", 0))
        bad = _all_reduce_max(self._local_bad or now > self._engine_skipped)
        self._engine_skipped, self._local_bad = now, False
        if bad:
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradients: optimizer step skipped (%d so far)",
                        step, self.skipped)
            if self.on_nan == "stop":
                raise NonFiniteLossError(f"non-finite loss or gradients at optimizer step {step} "
                                         "(train.on_nan=stop)")
            if self.skipped > self.max_nan_steps:
                raise NonFiniteLossError(f"{self.skipped} optimizer steps skipped for a non-finite loss or "
                                         f"gradients, more than train.max_nan_steps={self.max_nan_steps} "
                                         f"(last at step {step})")
        return {"nan_skipped": float(bad), "nan_steps_skipped": self.skipped}

    def summary(self) -> dict:
        return {"nan_steps_skipped": self.skipped}


# ---- checkpoints -------------------------------------------------------------------------

def _saved_step(ckpt_dir: Path) -> int:
    try:
        return int(json.loads((ckpt_dir / "effsft_state_rank0.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def checkpoint_candidates(latest: str | Path) -> list[Path]:
    """``latest`` first, then the run's earlier checkpoints beside it, newest step first."""
    latest = Path(latest)
    step = _saved_step(latest)
    others = [p for p in latest.parent.glob("checkpoint_*")
              if p.is_dir() and p.resolve() != latest.resolve() and _saved_step(p) < step]
    return [latest] + sorted(others, key=_saved_step, reverse=True)


def restore_latest_readable(engine, tag: str, load_module_strict: bool = True) -> dict | None:
    """Load the newest checkpoint that every rank can read; its ``client_state`` (None when
    Ray Train hands back no checkpoint). Raises when none can be read."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        candidates = checkpoint_candidates(d)
        errors = []
        for i, cand in enumerate(candidates):
            client, err = None, None
            try:
                _, client = engine.load_checkpoint(str(cand), tag=tag, load_module_strict=load_module_strict)
                if client is None or "position" not in client:
                    err = "no DeepSpeed state found"
            except Exception as e:  # a truncated or otherwise unreadable file
                err = f"{type(e).__name__}: {e}"[:300]
            if _all_reduce_min(err is None):
                if i:
                    log.warning("resumed from the earlier checkpoint %s (step %s): the later one(s) "
                                "could not be read: %s", cand, client["position"].get("step"), "; ".join(errors))
                return client
            errors.append(f"{cand.name}: {err or 'unreadable on another rank'}")
            log.warning("checkpoint %s cannot be loaded (%s); trying the previous one", cand,
                        err or "on another rank")
    raise RuntimeError(f"no readable checkpoint among {len(candidates)}: {'; '.join(errors)}")
