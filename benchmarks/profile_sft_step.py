"""Where an SFT step's time goes, phase by phase, in one process (no Ray), on the packed
micro-batches effsft's workers build (issue 15's profile).

Each variant runs the same packed micro-batches (``bench_packing``'s corpus and packing) with the
same threads and AdamW, interleaved step by step so a noisy machine hits every variant alike, and
reports the median seconds of each phase:

* ``hf``: what a user writes: ``model(**batch).loss`` (HF's full-logits loss) / backward / clip + AdamW;
* ``effsft_loss``: effsft's sft loss (chunked lm_head, recomputed in backward) with the same AdamW:
  the cost of the loss path alone;
* ``deepspeed``: effsft's loss inside the DeepSpeed engine effsft trains with (world size 1,
  ZeRO-0, ``train.loop.run_step``): the engine's overhead over ``effsft_loss``;
* ``two_pass``: Q-Tuning two_pass at 25 % samples x 50 % tokens: pass 1 (no-grad scoring of every
  token, with the entropy over the vocabulary), selection + pass 2 forward, backward, AdamW.

What Ray Train adds on top is the effsft job's logged ``step_s`` minus ``deepspeed`` (run
``bench_packing.py --only packed`` beside it).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/profile_sft_step.py --model small --steps 10
    PYTHONPATH=$PWD .venv/bin/python benchmarks/profile_sft_step.py --model models/smollm2-135m-instruct --steps 6
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bench_packing
import common


class Phases:
    """Wall seconds per named phase, per step."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def step(self) -> dict[str, float]:
        self.steps.append({})
        return self.steps[-1]

    def medians(self, skip: int = 1) -> dict[str, float]:
        rows = self.steps[skip:] or self.steps
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _clock(phases: dict, name: str, t0: float) -> float:
    t = time.perf_counter()
    phases[name] = phases.get(name, 0.0) + t - t0
    return t


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()


def hf_step(model, opt, b, ph):
    t = time.perf_counter()
    loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"], use_cache=False).loss
    t = _clock(ph, "forward+loss", t)
    loss.backward()
    t = _clock(ph, "backward", t)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _clock(ph, "clip+adamw", t)


def effsft_loss_step(model, opt, b, ph):
    from effsft.sft.loss import sft_loss

    t = time.perf_counter()
    loss, _ = sft_loss(model, b)
    t = _clock(ph, "forward+loss", t)
    loss.backward()
    t = _clock(ph, "backward", t)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _clock(ph, "clip+adamw", t)


def two_pass_step(model, opt, b, ph, cfg, step):
    from effsft.models.packing import RowBatch
    from effsft.models.parts import decoder_and_head
    from effsft.sft.qtuning_loss import qtuning_step_loss
    from effsft.sft.token_stats import label_masks, token_stats_from_hidden

    decoder, head = decoder_and_head(model)
    t = time.perf_counter()
    with torch.no_grad():  # pass 1 alone, as two_pass runs it (timed apart, then subtracted)
        rb = RowBatch(b)
        token_stats_from_hidden(rb.hidden(decoder), head.weight, rb.labels, label_masks(rb.labels, rb.attention_mask)[0],
                                with_entropy=True)
    t = _clock(ph, "pass1 scoring", t)
    loss, info = qtuning_step_loss(model, b, cfg, step=step)
    t = _clock(ph, "pass1+select+pass2 forward", t)
    loss.backward()
    t = _clock(ph, "backward", t)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _clock(ph, "clip+adamw", t)
    ph["pass2 rows / rows"] = info["pass2_rows"] / max(1, int(b["segment"].max()) + 1)


def _deepspeed(model_dir, a):
    import torch.distributed as dist

    from effsft.sft.loss import SFTLoss
    from effsft.sft.qtuning_config import QTuningSpec
    from effsft.train.config import TrainSpec
    from effsft.train.engine import build_engine
    from effsft.train.loop import LossModule

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    tr = TrainSpec(num_workers=1, zero_stage=0, micro_batch_size=a.mbs, lr=1e-4, clip=1.0, schedule="constant")
    return build_engine(LossModule(_model(model_dir), SFTLoss(QTuningSpec())), tr, total_steps=a.steps + 1, bf16=False)


def deepspeed_step(engine, b, ph, step):
    from effsft.train.loop import StepContext, run_step

    t = time.perf_counter()
    run_step(engine, [b], StepContext(step, 0, 1, 0, 1, torch.device("cpu")))
    _clock(ph, "run_step (forward+backward+step)", t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="tiny|small|base (a tiny model) or an HF model directory")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--length_spread", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--ppm", type=int, default=2, help="packs per micro-batch (bench_packing's run: 2)")
    a = ap.parse_args()
    common.set_env_defaults()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    from effsft.sft.qtuning_config import QTuningConfig

    with tempfile.TemporaryDirectory(prefix="profile-sft-") as d:
        data, model_dir = bench_packing._inputs(Path(d), a)
        rows = bench_packing._rows(model_dir, data, a.max_len)
        batches = bench_packing._packed_micro_batches(rows, a, a.ppm)[: a.steps]
        variants = {"hf": _model(model_dir), "effsft_loss": _model(model_dir), "two_pass": _model(model_dir)}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}
        engine = _deepspeed(model_dir, a)
        cfg = QTuningConfig(method="qtuning", sample_ratio=0.25, token_ratio=0.5, mode="two_pass")
        prof = {k: Phases() for k in ("hf", "effsft_loss", "deepspeed", "two_pass")}
        order = list(prof)
        for i, b in enumerate(batches):
            for k in order[i % 4:] + order[: i % 4]:  # rotate the order step by step
                ph = prof[k].step()
                if k == "hf":
                    hf_step(variants[k], opts[k], b, ph)
                elif k == "effsft_loss":
                    effsft_loss_step(variants[k], opts[k], b, ph)
                elif k == "deepspeed":
                    deepspeed_step(engine, b, ph, i)
                else:
                    two_pass_step(variants[k], opts[k], b, ph, cfg, i)
        tokens = statistics.mean(b["num_tokens"] for b in batches)
    print(f"{common.machine_line()}\nmodel {a.model}, {len(batches)} steps of {a.ppm} packs x {a.max_len} "
          f"({tokens:.0f} real tokens per step), {threads} threads; median seconds per phase (first step excluded)")
    totals = {}
    for k, p in prof.items():
        m = p.medians()
        if k == "two_pass":  # the timed-apart pass 1 is not part of the step
            m["selection+pass2 forward"] = m.pop("pass1+select+pass2 forward") - m["pass1 scoring"]
        share = m.pop("pass2 rows / rows", None)
        totals[k] = sum(m.values())
        print(f"  {k:12s} step {totals[k]:.3f} s: " + ", ".join(f"{n} {v:.3f}" for n, v in m.items())
              + (f"; pass 2 ran {share:.0%} of the rows" if share is not None else ""))
    print(f"effsft loss path / HF loss: {totals['effsft_loss'] / totals['hf']:.2f}x step time")
    print(f"DeepSpeed engine / same loss without it: {totals['deepspeed'] / totals['effsft_loss']:.2f}x step time")
    print(f"two_pass / plain (effsft loss, same optimizer): {totals['two_pass'] / totals['effsft_loss']:.2f}x step time")


if __name__ == "__main__":
    main()
