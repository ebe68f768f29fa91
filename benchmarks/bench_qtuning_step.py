"""Micro-benchmark: one SFT training step (forward + backward + AdamW) with Q-Tuning off / mask / two_pass.

Spec §3.3 cost model (F = forward FLOPs, backward ≈ 2F): off ≈ 3F(B), mask ≈ 3F(B) (+ scoring),
two_pass ≈ F(B) + 3F(kB), k = kept fraction (≥ r_s). Targets: mask ≤ 1.1x off, two_pass ≤ 0.75x off
at r_s = 0.25.

The modes are interleaved step by step in one process (same batches, rotating order) and the median
step time per mode is reported, so a noisy shared machine hits every mode alike.

Usage:
    PYTHONPATH=. python benchmarks/bench_qtuning_step.py [--steps 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import common
from effsft.sft.qtuning_config import QTuningConfig
from effsft.sft.qtuning_loss import qtuning_step_loss


def make_batch(step: int, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Random SFT batch: prompts of 16-64 tokens, total lengths T/2..T, right padding."""
    g = torch.Generator().manual_seed(1000 + step)
    B, T = args.batch, args.seq
    ids = torch.randint(0, args.vocab, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    prompts = torch.randint(16, 65, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    attn = (pos < lengths[:, None]).long()
    labels = ids.masked_fill((pos < prompts[:, None]) | (attn == 0), -100)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attn, labels=labels).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-ratio", type=float, default=0.25)
    p.add_argument("--token-ratio", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(args.seq, 64), attention_dropout=0.0,
    )
    model = LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, args.dtype)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    qt = dict(sample_ratio=args.sample_ratio, token_ratio=args.token_ratio)
    modes = {
        "off": (QTuningConfig(method="off"), "mask"),
        "mask": (QTuningConfig(method="qtuning", **qt), "mask"),
        "two_pass": (QTuningConfig(method="qtuning", **qt), "two_pass"),
    }
    # Reference only: HF's own loss (full [B, T, V] logits kept for backward), not a target.
    modes["hf_loss"] = (None, None)
    times: dict[str, list[float]] = {m: [] for m in modes}
    kept: list[int] = []
    for step in range(args.warmup + args.steps):
        batch = make_batch(step, args, device)
        names = list(modes)
        names = names[step % len(names) :] + names[: step % len(names)]  # rotate the order each step
        for name in names:
            qcfg, mode = modes[name]
            common.cuda_sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if qcfg is None:
                loss, info = model(**batch).loss, {}
            else:
                loss, info = qtuning_step_loss(model, batch, qcfg, mode, step=step)
            loss.backward()
            opt.step()
            common.cuda_sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                if name == "two_pass":
                    kept.append(info["pass2_rows"])
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} hidden={args.hidden} layers={args.layers} "
          f"vocab={args.vocab} B={args.batch} T={args.seq} r_s={args.sample_ratio} r_t={args.token_ratio} steps={args.steps}")
    print(f"two_pass kept rows per step: mean {statistics.mean(kept):.2f} of {args.batch}")
    for m in modes:
        print(f"{m:>9}: median {med[m] * 1e3:8.1f} ms  (min {min(times[m]) * 1e3:8.1f}, max {max(times[m]) * 1e3:8.1f})"
              f"   ratio to off {med[m] / med['off']:.3f}")
    print(f"targets: mask <= 1.10x off ({'OK' if med['mask'] <= 1.1 * med['off'] else 'MISS'}), "
          f"two_pass <= 0.75x off ({'OK' if med['two_pass'] <= 0.75 * med['off'] else 'MISS'})")


if __name__ == "__main__":
    main()
