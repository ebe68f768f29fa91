"""Quality experiment: full-data SFT vs Q-Tuning vs random sample pruning on a noisy corpus.

Question (the issue): on a synthetic corpus with label noise, does Q-Tuning (25% samples x 50%
tokens, arXiv:2509.23873) match or beat full-data SFT and a random 25% of samples, at the same
number of epochs? Every method trains a small Llama from ``effsft.models.tiny`` with the SAME loss
hook the ``effsft sft`` job uses (:class:`effsft.sft.loss.SFTLoss` with a
:class:`effsft.sft.recipe.QTuningSpec`), in a plain single-process torch AdamW loop (no Ray, no
DeepSpeed: the job's distributed plumbing is benchmarked elsewhere, see ``bench_sft.py``).

Paired design: for a seed, every method starts from the same initial weights and walks the same
shuffled batches (same epochs, same micro-batch size, same optimizer steps); Q-Tuning and the
random baselines select inside each micro-batch (spec qtuning.md §3.4), so they see every row
but train on ~25% of them.

Measured per (method, seed): exact-match accuracy on the clean held-out eval split (overall and
per task, ``effsft.eval.metrics.exact_match``), response perplexity on that split
(``effsft.eval.metrics.perplexity``), the share of labelled-noisy rows among the kept samples,
the share of answer tokens of noisy / clean rows that stayed in the loss (token pruning may drop
a wrong answer while keeping the row), and wall time.

The kept masks are read by wrapping ``effsft.sft.qtuning_loss.qtuning_step_loss`` (the function the
hook calls); the wrapper only records ``info['keep']``, ``info['decision']`` and
``info['keep_token']`` and returns the result unchanged. The noisy flag and the answer-token mask
travel next to the batch, never into the model.

Usage (see benchmarks/SFT_QUALITY.md for the measured run):
    PYTHONPATH=$PWD python benchmarks/bench_sft_quality.py --epochs 3 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

import common
import effsft.sft.qtuning_loss as qtl
from effsft.corpus.synth import SynthSettings, heldout_rows, train_rows
from effsft.corpus.tokenize import IGNORE_INDEX, collate, encode_chat, render
from effsft.eval.metrics import exact_match, perplexity
from effsft.models.tiny import build_tiny_model, build_tokenizer
from effsft.sft.loss import SFTLoss
from effsft.sft.recipe import QTuningSpec
from effsft.train.loop import StepContext

# name -> qtuning.* keys. two_pass selects the same samples/tokens as mask (docs/algorithms/qtuning.md §3.3, tested).
METHODS = {
    "full": dict(method="off"),
    "qtuning": dict(method="qtuning", sample_ratio=0.25, token_ratio=0.5, mode="two_pass"),
    "random25": dict(method="random_sample", sample_ratio=0.25, token_ratio=1.0, mode="two_pass"),
    "random25x50": dict(method="random_sample", sample_ratio=0.25, token_ratio=0.5, mode="two_pass"),
}


# ---- data ------------------------------------------------------------------------------------

@dataclass
class Row:
    """One tokenised train row plus what the model must not see."""

    enc: object               # effsft.corpus.tokenize.Encoded
    noisy: bool               # meta.noisy: the answer is wrong
    answer_pos: list[int]     # label positions of the exact-match answer tokens


def _messages(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def make_corpus(args) -> tuple[list[dict], list[dict]]:
    """(train records with parsed meta, clean held-out eval rows) from :mod:`effsft.corpus.synth`."""
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.task_mix.split(","))}
    s = SynthSettings(rows=args.rows, noise=args.noise, dup=args.dup, task_mix=mix,
                      length_spread=args.length_spread, n_entities=args.n_entities, seed=args.data_seed)
    train = []
    for r in train_rows(s):
        meta = json.loads(r["meta"])
        train.append({"messages": list(r["messages"]), "noisy": bool(meta.get("noisy")),
                      "task": meta.get("task")})
    ev = [{"messages": _messages(r["prompt"], r["response"]), "answer": r["answer"], "task": r["task"]}
          for r in heldout_rows(s, args.eval_rows, "eval")]
    return train, ev


def answer_positions(tok, messages: list[dict], n_ids: int) -> list[int]:
    """Token positions of the text after the response's last ``Answer:`` (eos excluded).

    Tokenises the rendered text exactly as ``encode_chat`` does (no truncation happens here:
    rows are short), so positions index its ``input_ids``/``labels``.
    """
    full = render(tok, messages)
    start = full.rfind("Answer:") + len("Answer:")
    end = full.rfind(tok.eos_token)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == n_ids
    return [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a >= start and b <= end and b > a
            and full[a:b].strip()]


def tokenise(tok, train: list[dict], max_len: int) -> tuple[list[Row], int]:
    rows, too_long = [], 0
    for r in train:
        e = encode_chat(tok, r["messages"], max_len)
        if e.too_long or e.n_response == 0 or e.truncated:
            too_long += 1
            continue
        rows.append(Row(e, r["noisy"], answer_positions(tok, r["messages"], len(e.input_ids))))
    return rows, too_long


def make_batch(rows: list[Row], pad_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(model batch, noisy [B] bool, answer_mask [B, T] bool in label coordinates)."""
    batch = collate([r.enc for r in rows], pad_id)
    answer = torch.zeros(batch["labels"].shape, dtype=torch.bool)  # [B, T]
    for i, r in enumerate(rows):
        answer[i, r.answer_pos] = True
    answer &= batch["labels"] != IGNORE_INDEX
    return batch, torch.tensor([r.noisy for r in rows]), answer


def schedule(n_rows: int, mbs: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Row indices per step: a fresh permutation per epoch, last partial batch dropped."""
    rng = np.random.default_rng([seed, 12345])
    out = []
    for _ in range(epochs):
        perm = rng.permutation(n_rows)
        out += [perm[i:i + mbs] for i in range(0, n_rows - mbs + 1, mbs)]
    return out


# ---- the tap on the hook's selection ---------------------------------------------------------

class KeepTap:
    """Records the selection of the last ``qtuning_step_loss`` call (None: no selection ran)."""

    def __init__(self):
        self.last: dict | None = None

    @contextlib.contextmanager
    def installed(self):
        orig = qtl.qtuning_step_loss

        def wrapped(*a, **kw):
            loss, info = orig(*a, **kw)
            self.last = {"keep": np.asarray(info["keep"], dtype=bool), "decision": info["decision"],
                         "keep_token": info["keep_token"].detach().cpu().bool()}
            return loss, info

        qtl.qtuning_step_loss = wrapped  # effsft.sft.loss imports it at call time
        try:
            yield self
        finally:
            qtl.qtuning_step_loss = orig


class NoiseCounter:
    """Noisy share among kept rows and answer-token keep rates (noisy vs clean rows)."""

    def __init__(self):
        self.c = dict(seen=0, seen_noisy=0, kept=0, kept_noisy=0, ans_noisy=0, ans_noisy_kept=0,
                      ans_clean=0, ans_clean_kept=0)
        self.by_decision: dict[str, list[int]] = {}  # decision -> [rows, noisy rows]

    def add(self, noisy: torch.Tensor, answer: torch.Tensor, keep: np.ndarray, keep_token: torch.Tensor,
            decision) -> None:
        c = self.c
        k = torch.from_numpy(keep)
        c["seen"] += len(noisy)
        c["seen_noisy"] += int(noisy.sum())
        c["kept"] += int(k.sum())
        c["kept_noisy"] += int((k & noisy).sum())
        kept_ans = answer & keep_token  # [B, T]
        c["ans_noisy"] += int(answer[noisy].sum())
        c["ans_noisy_kept"] += int(kept_ans[noisy].sum())
        c["ans_clean"] += int(answer[~noisy].sum())
        c["ans_clean_kept"] += int(kept_ans[~noisy].sum())
        for d, n in zip(decision, noisy.tolist()):
            v = self.by_decision.setdefault(str(d), [0, 0])
            v[0] += 1
            v[1] += int(n)

    def summary(self) -> dict:
        c = self.c
        return {"noise_seen": c["seen_noisy"] / max(1, c["seen"]),
                "kept_rows_frac": c["kept"] / max(1, c["seen"]),
                "noise_kept": c["kept_noisy"] / max(1, c["kept"]),
                "ans_keep_noisy": c["ans_noisy_kept"] / max(1, c["ans_noisy"]),
                "ans_keep_clean": c["ans_clean_kept"] / max(1, c["ans_clean"]),
                "by_decision": {d: {"rows": v[0], "noisy_frac": v[1] / max(1, v[0])}
                                for d, v in sorted(self.by_decision.items())}}


# ---- one run ---------------------------------------------------------------------------------

def train_one(name: str, seed: int, rows: list[Row], tok, ev: list[dict], args) -> dict:
    spec = QTuningSpec(**METHODS[name])
    hook = SFTLoss(spec, chunk_tokens=1024, seed=seed)  # exactly what the sft job's loop calls
    model = build_tiny_model("llama", tok, seed=seed, size="small", hidden_size=args.hidden,
                             intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    plan = schedule(len(rows), args.mbs, args.epochs, seed)
    tap, counter, losses = KeepTap(), NoiseCounter(), []
    t0 = time.perf_counter()
    with tap.installed():
        for step, idx in enumerate(plan):
            batch, noisy, answer = make_batch([rows[i] for i in idx], tok.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = common.warmup_cosine_lr(step, len(plan), args.lr, args.warmup)
            ctx = StepContext(step=step, micro_step=0, grad_accum=1, rank=0, world_size=1,
                              device=torch.device("cpu"))
            tap.last = None
            loss, _ = hook(model, batch, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if tap.last is None:  # method off: every row and every response token is trained on
                resp = batch["labels"] != IGNORE_INDEX
                resp[:, 0] = False
                counter.add(noisy, answer, np.ones(len(idx), bool), resp, ["kept"] * len(idx))
            else:
                counter.add(noisy, answer, tap.last["keep"], tap.last["keep_token"], tap.last["decision"])
            if args.log_every and step % args.log_every == 0:
                print(f"  [{name} s{seed}] step {step}/{len(plan)} loss {losses[-1]:.3f} "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    t1 = time.perf_counter()
    em = exact_match(model, tok, ev, max_new_tokens=args.max_new_tokens, batch_size=args.eval_bs)
    ppl = perplexity(model, tok, [r["messages"] for r in ev], max_len=args.max_len, batch_size=32)
    eval_s = time.perf_counter() - t1
    tail = losses[-max(1, len(losses) // 20):]
    return {"method": name, "seed": seed, "steps": len(plan), "accuracy": em["accuracy"],
            "per_task": em["per_task"], "ppl": ppl["ppl"], "train_loss_tail": sum(tail) / len(tail),
            "train_s": train_s, "eval_s": eval_s, "samples": em["samples"][:3], **counter.summary()}


# ---- report ----------------------------------------------------------------------------------

def _ms(xs: list[float], fmt: str = "{:.3f}") -> str:
    if len(xs) < 2:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def report(results: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    tasks = sorted({t for r in results for t in r["per_task"]})
    by = {(r["method"], r["seed"]): r for r in results}
    lines = ["| method | " + " | ".join(f"acc s{s}" for s in seeds)
             + " | acc mean ± std | eval ppl | noisy share of kept rows (seen) "
             "| answer tokens trained: noisy / clean | train s / run | eval s / run |",
             "|---" * (len(seeds) + 7) + "|"]
    for m in methods:
        rs = [by[(m, s)] for s in seeds if (m, s) in by]
        accs = [r["accuracy"] for r in rs]
        lines.append(
            f"| {m} | " + " | ".join(f"{by[(m, s)]['accuracy']:.3f}" if (m, s) in by else "—" for s in seeds)
            + f" | {_ms(accs)} | {_ms([r['ppl'] for r in rs], '{:.2f}')}"
            + f" | {_ms([r['noise_kept'] for r in rs])} ({statistics.mean(r['noise_seen'] for r in rs):.3f})"
            + f" | {statistics.mean(r['ans_keep_noisy'] for r in rs):.3f} / "
              f"{statistics.mean(r['ans_keep_clean'] for r in rs):.3f}"
            + f" | {statistics.mean(r['train_s'] for r in rs):.0f} | {statistics.mean(r['eval_s'] for r in rs):.0f} |")
    lines += ["", "Per-task exact match (mean over seeds):", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        lines.append(f"| {m} | " + " | ".join(
            f"{statistics.mean(r['per_task'].get(t, 0.0) for r in rs):.3f}" for t in tasks) + " |")
    qt = [r for r in results if r["method"] == "qtuning"]
    if qt:
        agg: dict[str, list[int]] = {}
        for r in qt:
            for d, v in r["by_decision"].items():
                a = agg.setdefault(d, [0, 0])
                a[0] += v["rows"]
                a[1] += round(v["rows"] * v["noisy_frac"])
        total = sum(v[0] for v in agg.values())
        lines += ["", "Q-Tuning decisions over all steps and seeds (row share, noisy share within):", "",
                  "| decision | share of rows | noisy share |", "|---|---|---|"]
        lines += [f"| {d} | {v[0] / total:.3f} | {v[1] / max(1, v[0]):.3f} |" for d, v in sorted(agg.items())]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--dup", type=float, default=0.05)
    p.add_argument("--task-mix", default="arith=1,string=1,count=1,format=1,fact=1")
    p.add_argument("--length-spread", type=int, default=1)
    p.add_argument("--n-entities", type=int, default=40)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=300)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--mbs", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-bs", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["full", "qtuning", "random25", "random25x50"],
                   choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (forked processes)")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--report-from", nargs="+", default=None,
                   help="only print the tables from the --json files of earlier runs (merged)")
    args = p.parse_args(argv)
    if args.report_from:
        merged = {}
        for path in args.report_from:
            with open(path) as f:
                for r in json.load(f)["results"]:
                    merged[(r["method"], r["seed"])] = r
        print(report(sorted(merged.values(), key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))))
        return

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train, ev = make_corpus(args)
    tok = build_tokenizer(["\n".join(m["content"] for m in r["messages"]) for r in train], args.vocab)
    rows, too_long = tokenise(tok, train, args.max_len)
    lens = [len(r.enc.input_ids) for r in rows]
    print(f"corpus: {len(train)} train rows ({sum(r['noisy'] for r in train)} noisy), {len(rows)} "
          f"tokenised ({too_long} too long), mean/max len {statistics.mean(lens):.0f}/{max(lens)}, "
          f"eval {len(ev)}, vocab {len(tok)}, prep {time.perf_counter() - t0:.0f}s", flush=True)
    runs = [(m, s) for s in args.seeds for m in args.methods]  # a seed's comparison completes early
    results = []

    def done(r: dict) -> None:
        results.append(r)
        print(f"{r['method']:12s} seed {r['seed']}: acc {r['accuracy']:.3f} ppl {r['ppl']:.2f} "
              f"loss_tail {r['train_loss_tail']:.3f} noise_kept {r['noise_kept']:.3f} "
              f"train {r['train_s']:.0f}s eval {r['eval_s']:.0f}s per_task "
              + json.dumps({k: round(v, 3) for k, v in r["per_task"].items()}), flush=True)
        if args.json:
            common.write_json(args.json, {"args": vars(args), "results": results}, indent=1)

    if args.jobs <= 1:
        for m, s in runs:
            done(train_one(m, s, rows, tok, ev, args))
    else:  # one single-threaded process per run; the shared machine has 2 cores
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs, initializer=torch.set_num_threads,
                                          initargs=(args.threads,), maxtasksperchild=1) as pool:
            pending = [pool.apply_async(train_one, (m, s, rows, tok, ev, args)) for m, s in runs]
            for f in pending:
                done(f.get())
    results.sort(key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))
    print()
    print(report(results))
    print(f"\ntotal wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
