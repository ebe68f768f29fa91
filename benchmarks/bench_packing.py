"""Packing benchmarks, every ratio measured side by side in one run on this machine.

1. effsft SFT packed (``train.packing=bfd``) vs padded (``off``) tokens/s, same rows and steps;
2. effsft in its default layout (1 worker on this machine, ZeRO-0, packed) vs the plain loop a
   user would write with the same cores: HF ``model(**batch).loss`` + ``torch.optim.AdamW`` over
   the same packed micro-batches (position ids restarting per row, as effsft feeds them);
3. effsft packed vs TRL's ``SFTTrainer`` with ``packing=True`` (``packing_strategy="bfd"``) and
   ``padding_free=True``, and (3b) vs TRL with padded batches of ``mbs`` rows, on the same pre-tokenised rows (the same token ids and labels), the same
   pack length, packs per step, optimizer (AdamW, same lr) and threads;
4. Q-Tuning ``two_pass`` at 25 % samples x 50 % tokens vs plain SFT, step time (packed);
5. select's LM scoring rows/s on packed batches vs today's length-sorted padded batches.

Throughput is steady state: real (non-pad) tokens over the wall time of the optimizer steps after
the first (start-up, tokenisation and model export excluded on every side). The machine must be
otherwise idle.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_packing.py --model small --rows 600 --steps 8
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_packing.py --model models/smollm2-135m-instruct --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import common


def _inputs(tmp: Path, a) -> tuple[Path, Path]:
    corpus = common.synth_corpus(tmp / "corpus", clean=True, rows=a.rows, length_spread=a.length_spread,
                                 eval_rows=8, grpo_rows=8, seed=0)
    if Path(a.model).is_dir():
        return corpus / "train", Path(a.model)
    return corpus / "train", common.tiny_model(tmp / "model", corpus, size=a.model, seed=0)


def _rows(model: Path, data: Path, max_len: int) -> list[tuple[list[int], list[int]]]:
    import pyarrow.parquet as pq

    from effsft.corpus.tokenize import encode_chat
    from effsft.models.loading import load_tokenizer

    tok = load_tokenizer(model)
    msgs = [m for f in sorted(data.glob("*.parquet")) for m in pq.read_table(f).column("messages").to_pylist()]
    enc = [encode_chat(tok, m, max_len) for m in msgs]
    return [(e.input_ids, e.labels) for e in enc if not e.too_long and e.n_response]


def effsft_sft(model, data, out, a, **train) -> dict:
    from effsft.config import build_config
    from effsft.sft.recipe import SFTConfig, run_sft
    from effsft.train.loop import read_metrics

    qtuning = train.pop("qtuning", {})
    cfg = build_config(SFTConfig, {
        "model": {"path": str(model), "dtype": "float32"}, "data": {"path": str(data)}, "output": str(out),
        "tokenize": {"max_len": a.max_len}, "qtuning": qtuning,
        "train": {"num_workers": 1, "micro_batch_size": a.mbs, "lr": 1e-4, "max_steps": a.steps,
                  "checkpoint_every": 0, "schedule": "constant", **train}})
    run_sft(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    tps, step = common.steady_state(rows)
    m = json.loads((out / "manifest.json").read_text())
    return {"tokens_per_s": tps, "median_step_s": step, "packing": m["counts"].get("packing")}


def _packed_micro_batches(rows, a, ppm: int):
    """The micro-batches effsft's workers build: windows planned best-fit, ``ppm`` packs each."""
    from effsft.models.packing import pack_rows, plan_packs
    from effsft.train.data import PACK_WINDOW_ROWS

    queue = []
    for s in range(0, len(rows), PACK_WINDOW_ROWS):
        w = rows[s:s + PACK_WINDOW_ROWS]
        queue += [[w[i] for i in p] for p in plan_packs([len(x) for x, _ in w], a.max_len, "bfd").packs]
    out = []
    for s in range(0, len(queue) - ppm + 1, ppm):
        group = queue[s:s + ppm]
        flat = [r for p in group for r in p]
        idx, at = [], 0
        for p in group:
            idx.append(list(range(at, at + len(p))))
            at += len(p)
        out.append(pack_rows(flat, idx, 0))
    return out


def plain_loop(model_dir, rows, a, ppm: int, threads: int) -> dict:
    """What a user writes: HF loss + AdamW on the same packed micro-batches."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = _packed_micro_batches(rows, a, ppm)[: a.steps]
    steps = []
    for b in batches:
        t0 = time.perf_counter()
        loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"tokens": b["num_tokens"], "step_s": time.perf_counter() - t0})
    tps, step = common.steady_state(steps)
    return {"tokens_per_s": tps, "median_step_s": step}


def trl_sft(model_dir, rows, a, ppm: int, threads: int, out: Path, packed: bool = True) -> dict:
    """TRL SFTTrainer on effsft's token ids and labels: packing bfd + padding_free (``packed``), or
    padded batches of ``mbs`` rows (what TRL does on a CPU without FlashAttention done right:
    its padding-free path attends over the whole flattened batch there)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from effsft.models.loading import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    ds = Dataset.from_dict({"input_ids": [x for x, _ in rows], "labels": [y for _, y in rows]})
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

    layout = (dict(per_device_train_batch_size=ppm, packing=True, packing_strategy="bfd", padding_free=True)
              if packed else dict(per_device_train_batch_size=a.mbs, packing=False, padding_free=False))
    cfg = SFTConfig(output_dir=str(out), max_steps=a.steps, learning_rate=1e-4, **layout,
                    lr_scheduler_type="constant",
                    max_length=a.max_len, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6,
                    dataloader_num_workers=0, max_grad_norm=1.0, optim="adamw_torch", seed=0,
                    # TRL's defaults are bf16 autocast and activation checkpointing: on a CPU
                    # without bf16 matmul units that is ~25x slower; compare like for like (fp32,
                    # no recomputation), as effsft and the plain loop run.
                    bf16=False, gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    data = trainer.train_dataset
    mean_len = sum(len(x) for x in data["input_ids"]) / len(data)  # a pack, or a row (real tokens)
    trainer.train()
    per_step = mean_len * (ppm if packed else a.mbs)
    tps, step = common.steady_state([{"tokens": per_step, "step_s": t} for t in times])
    return {"tokens_per_s": tps, "median_step_s": step, "rows_or_packs": len(data)}


def scoring(model_dir, data, a, threads: int) -> dict:
    import pyarrow.parquet as pq

    from effsft.models.loading import load_model, load_tokenizer
    from effsft.select.lm_scores import lm_score_rows

    torch.set_num_threads(threads)
    tok, model = load_tokenizer(model_dir), load_model(model_dir, dtype="float32")
    msgs = [m for f in sorted(data.glob("*.parquet")) for m in pq.read_table(f).column("messages").to_pylist()]
    msgs = msgs[: a.score_rows]
    out = {}
    for packing in (False, True):
        t0 = time.perf_counter()
        s = lm_score_rows(model, tok, msgs, batch_size=a.mbs, compute_ifd=False, packing=packing)
        out["packed" if packing else "padded"] = {"rows_per_s": len(msgs) / (time.perf_counter() - t0),
                                                  "ce_mean": float(s["ce"][s["status"] == "ok"].mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="tiny|small|base (a tiny model) or an HF model directory")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--length_spread", type=int, default=12)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--score_rows", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=["padded", "packed", "plain", "trl", "trl_padded", "qtuning", "score"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    common.set_env_defaults()
    threads = os.cpu_count() or 1
    res: dict = {"model": a.model, "rows": a.rows, "steps": a.steps, "mbs": a.mbs, "max_len": a.max_len,
                 "threads": threads}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as d:
        tmp = Path(d)
        data, model = _inputs(tmp, a)
        rows = _rows(model, data, a.max_len)
        if "packed" in a.only:
            res["effsft_packed"] = effsft_sft(model, data, tmp / "packed", a, packing="bfd")
        ppm = (res.get("effsft_packed") or {}).get("packing", {}) or {}
        ppm = ppm.get("packs_per_micro_batch", 1)
        if "padded" in a.only:
            res["effsft_padded"] = effsft_sft(model, data, tmp / "padded", a, packing="off")
        if "plain" in a.only:
            res["plain_loop"] = plain_loop(model, rows, a, ppm, threads)
        if "trl" in a.only:
            res["trl"] = trl_sft(model, rows, a, ppm, threads, tmp / "trl")
        if "trl_padded" in a.only:
            res["trl_padded"] = trl_sft(model, rows, a, ppm, threads, tmp / "trl_padded", packed=False)
        if "qtuning" in a.only:
            res["qtuning_two_pass"] = effsft_sft(model, data, tmp / "qt", a, packing="bfd", qtuning={
                "method": "qtuning", "sample_ratio": 0.25, "token_ratio": 0.5, "mode": "two_pass"})
            res.setdefault("effsft_packed", effsft_sft(model, data, tmp / "packed2", a, packing="bfd"))
        if "score" in a.only:
            res["scoring"] = scoring(model, data, a, threads)
    print(json.dumps(res, indent=1, default=str))
    r = res
    lines = []
    if "effsft_padded" in r and "effsft_packed" in r:
        lines.append(f"1. packed / padded SFT tokens/s:            {r['effsft_packed']['tokens_per_s'] / r['effsft_padded']['tokens_per_s']:.2f}x (goal >= 1.5)")
    if "plain_loop" in r and "effsft_packed" in r:
        lines.append(f"2. effsft default / plain HF loop tokens/s: {r['effsft_packed']['tokens_per_s'] / r['plain_loop']['tokens_per_s']:.2f}x (goal >= 0.9)")
    if "trl" in r and "effsft_packed" in r:
        lines.append(f"3. effsft packed / TRL SFTTrainer tokens/s: {r['effsft_packed']['tokens_per_s'] / r['trl']['tokens_per_s']:.2f}x (goal >= 1.0)")
    if "trl_padded" in r and "effsft_packed" in r:
        lines.append(f"3b. effsft packed / TRL SFTTrainer padded:   {r['effsft_packed']['tokens_per_s'] / r['trl_padded']['tokens_per_s']:.2f}x"
                     + (f" (effsft padded / TRL padded {r['effsft_padded']['tokens_per_s'] / r['trl_padded']['tokens_per_s']:.2f}x)"
                        if "effsft_padded" in r else ""))
    if "qtuning_two_pass" in r:
        lines.append(f"4. Q-Tuning two_pass / plain step time:      {r['qtuning_two_pass']['median_step_s'] / r['effsft_packed']['median_step_s']:.2f}x (goal <= 0.6)")
    if "scoring" in r:
        lines.append(f"5. scoring rows/s packed / padded:          {r['scoring']['packed']['rows_per_s'] / r['scoring']['padded']['rows_per_s']:.2f}x")
    print("\n".join(lines))
    if a.json:
        common.write_json(a.json, {**res, "ratios": lines}, indent=1)


if __name__ == "__main__":
    main()
