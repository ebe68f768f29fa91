"""Ray Data actor-pool overhead of LM scoring vs a plain single-process torch loop.

    PYTHONPATH=. python benchmarks/bench_select_overhead.py --rows 4000 --shards 4
    PYTHONPATH=. python benchmarks/bench_select_overhead.py --quick

Same model (a ``small`` tiny Llama: hidden 256, 4 layers, random weights — the cost of a
forward does not depend on the weights), same rows (a synthetic corpus in several Parquet
shards), same micro-batch size and rows per call, same total torch threads, measured in the
same run:

* ``plain T``  : ``lm_score_rows`` over the shards in the driver, ``torch.set_num_threads(T)``;
* ``ray A×t``  : ``effsft.select.pipeline.score_shards`` with the ``LMScorer`` on A actors of
  t threads each (what ``effsft select`` runs for ce/ppl/entropy).

One-time model loading is EXCLUDED from the headline rows/s of both and reported separately:
for the plain loop it is the load time in the driver; for Ray the "scoring" window runs from
the moment the first actor has its model loaded to the moment the last shard is written (so
it still contains the start-up of any later actor, which competes for the same cores). The
end-to-end wall (Ray Data planning, actor start, model load, scoring, writing) is reported too.

Also prints the 1M-row cost model of docs/algorithms/data_selection.md §4: hours on this CPU for the measured rows/s, and
H100-hours for a 1.7B model from FLOPs, rows/s = η·989e12 / (2·P·T̄·passes), η = 0.35, with
the measured mean tokens per row T̄ of this corpus (per pass kind: ce, ifd, selectit).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import common


class TimedLMScorer:
    """LMScorer that appends its load time and every call's wall window to a JSONL log.

    Defined in ``__main__`` so Ray ships it by value; workers only import effsft.
    """

    def __init__(self, log_path: str, **kwargs):
        from effsft.select.scorers import LMScorer

        self.log_path = log_path
        t0 = time.time()
        self.inner = LMScorer(**kwargs)
        self._log({"event": "init", "start": t0, "end": time.time()})

    def _log(self, rec: dict) -> None:
        import torch

        rec.update(pid=os.getpid(), threads=torch.get_num_threads())
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def __call__(self, batch):
        t0 = time.time()
        out = self.inner(batch)
        self._log({"event": "call", "start": t0, "end": time.time(), "rows": batch.num_rows})
        return out


def row_tokens(tok, messages_list, max_len: int) -> dict:
    """Per-row token counts of the passes each LM score runs (tiny BPE tokenizer)."""
    from effsft.corpus.tokenize import empty_prompt_ids
    from effsft.select.lm_scores import STATUS_OK, encode_pair
    from effsft.select.selectit import RATING_PROMPTS, build_prompt_ids, conversation_pairs

    enc = [encode_pair(tok, m, max_len) for m in messages_list]
    ok = [e for e in enc if e.status == STATUS_OK]
    header = len(empty_prompt_ids(tok))  # the unconditioned pass: the template's empty prompt
    ce = np.array([len(e.prompt_ids) + len(e.answer_ids) for e in ok], np.float64)
    ans = np.array([len(e.answer_ids) for e in ok], np.float64)
    sel = []
    for m in messages_list[:500]:  # SelectIT: 5 rating prompts around the row (a sample suffices)
        pairs = conversation_pairs(m)
        sel.append(sum(len(build_prompt_ids(tok, p, pairs)[0]) for p in RATING_PROMPTS))
    return {"ce": float(ce.mean()), "answer": float(ans.mean()), "ifd": float((ce + header + ans).mean()),
            "selectit": float(np.mean(sel)), "bytes": float(np.mean(
                [sum(len(x["content"].encode()) for x in m) for m in messages_list]))}


def plain_loop(model_dir: Path, shards: list[Path], threads: int, batch_rows: int, micro: int,
               max_len: int) -> dict:
    """The baseline: load once, then lm_score_rows over ``batch_rows``-row slices of each shard."""
    import pyarrow.parquet as pq
    import torch

    from effsft.models.loading import load_model, load_tokenizer
    from effsft.select.lm_scores import lm_score_rows

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok, model = load_tokenizer(model_dir), load_model(model_dir, dtype="auto", device="cpu")
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    ce, rows = {}, 0
    for p in shards:
        t = pq.read_table(p, columns=["id", "messages"])
        ids, msgs = t.column("id").to_pylist(), t.column("messages").to_pylist()
        for s in range(0, len(msgs), batch_rows):
            with torch.no_grad():
                out = lm_score_rows(model, tok, msgs[s:s + batch_rows], max_len=max_len, batch_size=micro,
                                    compute_ifd=False)
            ce.update(zip(ids[s:s + batch_rows], out["ce"].tolist()))
            rows += len(out["ce"])
    t_score = time.perf_counter() - t1
    torch.set_num_threads(prev)
    return {"load_s": t_load, "score_s": t_score, "wall_s": t_load + t_score, "rows": rows, "ce": ce}


def ray_pool(model_dir: Path, shards: list[Path], actors: int, threads: int, batch_rows: int, micro: int,
             max_len: int, work: Path, tag: str) -> dict:
    import pyarrow.parquet as pq

    from effsft.select.pipeline import PoolSpec, score_shards
    from effsft.select.store import ScoreStore

    log_path = work / f"{tag}.jsonl"
    store = ScoreStore(work / f"cache-{tag}", "lm", {"tag": tag})
    kwargs = dict(log_path=str(log_path), model_path=str(model_dir), dtype="auto", max_len=max_len,
                  micro_batch_size=micro, ifd=False, threads=threads)
    t0 = time.time()
    stats = score_shards(store, shards, TimedLMScorer, kwargs,
                         PoolSpec(concurrency=actors, num_cpus=0.5, batch_size=batch_rows))
    t_end = time.time()
    recs = [json.loads(x) for x in log_path.read_text().splitlines()]
    inits = [r for r in recs if r["event"] == "init"]
    calls = [r for r in recs if r["event"] == "call"]
    first_ready = min(r["end"] for r in inits)
    per_actor = {}
    for r in calls:
        a = per_actor.setdefault(r["pid"], {"rows": 0, "busy_s": 0.0, "threads": r["threads"]})
        a["rows"] += r["rows"]
        a["busy_s"] += r["end"] - r["start"]
    tab = store.read([p.stem for p in shards], columns=["id", "score_ce"])
    ce = dict(zip(tab.column("id").to_pylist(), tab.column("score_ce").to_pylist()))
    return {"wall_s": t_end - t0, "score_s": t_end - first_ready, "load_s": float(np.mean(
        [r["end"] - r["start"] for r in inits])), "startup_s": first_ready - t0, "rows": stats.rows_scored,
        "actors_used": len(per_actor), "actors_started": len(inits), "per_actor": per_actor, "ce": ce,
        "expected": sum(pq.read_metadata(p).num_rows for p in shards)}


def cost_model(rows_per_s: float, tbar: dict, params: float = 1.7e9, eta: float = 0.35,
               peak: float = 989e12) -> list[str]:
    out = ["", "### Cost model (1M rows)", "",
           f"measured CPU throughput (ce, best plain configuration): {rows_per_s:.1f} rows/s -> "
           f"{1e6 / rows_per_s / 3600:.1f} h per 1M rows on this machine (2 cores)", "",
           f"H100 estimate for a {params / 1e9:.1f}B model: rows/s = η·{peak:.3g}/(2·P·T̄·passes), η = {eta}; "
           "T̄ measured on this corpus with the tiny 512-vocab BPE (a 150k-vocab tokenizer gives "
           f"≈ bytes/4 = {tbar['bytes'] / 4:.0f} tokens/row, shown in the last column)", "",
           "| score | passes | tokens/row (tiny BPE) | rows/s per H100 | H100-hours / 1M rows | "
           "H100-hours at bytes/4 tokens |", "|---|---|---|---|---|---|"]
    rate = eta * peak / (2 * params)  # tokens/s
    scale = (tbar["bytes"] / 4) / tbar["ce"]  # real-tokenizer / tiny-tokenizer token ratio
    for name, passes, toks in (("ce / ppl / entropy", "1", tbar["ce"]),
                               ("ifd", "2 (Q+A, header+A)", tbar["ifd"]),
                               ("selectit", "5 rating prompts", tbar["selectit"])):
        rps = rate / toks
        out.append(f"| {name} | {passes} | {toks:.0f} | {rps:,.0f} | {1e6 / rps / 3600:.2f} | "
                   f"{1e6 / (rate / (toks * scale)) / 3600:.2f} |")
    return out


def main() -> None:
    common.set_env_defaults(ray=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="total torch threads of each configuration")
    ap.add_argument("--configs", default=None,
                    help="comma list of KIND:AxT (plain:1xT = driver loop with T threads, ray:AxT = A actors "
                         "of T threads); default plain:1x2,plain:1x1,ray:2x1,ray:1x2,ray:1x1; the first is "
                         "the baseline")
    ap.add_argument("--batch-rows", type=int, default=256, help="rows per call (scorer.batch_size)")
    ap.add_argument("--micro", type=int, default=8, help="rows per forward (scorer.micro_batch_size)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--workdir", default=None, help="keep corpus/model here (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="600 rows, 2 shards, tiny model, plain vs ray only (< 2 min)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.shards, args.size = 600, 2, "tiny"
        args.configs = args.configs or f"plain:1x{args.threads},ray:{args.threads}x1"
    with common.work_dir(args.workdir, "selbench-ovh-") as tmp:
        measure(args, tmp)


def measure(args, tmp: Path) -> None:
    print(common.machine_line())
    corpus = common.make_corpus(tmp / f"corpus-{args.rows}", args.rows, -(-args.rows // args.shards))
    model_dir = common.tiny_model(tmp / f"model-{args.size}", corpus, size=args.size)
    shards = sorted((corpus / "train").glob("shard-*.parquet"))

    import pyarrow.parquet as pq

    from effsft.models.loading import count_params, load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    msgs = [m for p in shards for m in pq.read_table(p, columns=["messages"]).column("messages").to_pylist()]
    tbar = row_tokens(tok, msgs, args.max_len)
    n_params = count_params(load_model(model_dir))
    print(f"model {args.size}: {n_params / 1e6:.2f}M params, vocab {len(tok)}; rows {len(msgs)} in "
          f"{len(shards)} shards; mean tokens/row {tbar['ce']:.1f} (answer {tbar['answer']:.1f}); "
          f"batch {args.batch_rows} rows/call, micro-batch {args.micro}")

    common.init_local_ray()
    work = tmp / f"runs-{int(time.time())}"
    work.mkdir()
    T = args.threads
    # plain 1 thr and ray 1×1 too: on a loaded 2-core box, 2 OpenMP threads in one process can
    # be far slower than 1 (barrier waits), so per-process threading must be compared like for like.
    spec = args.configs or f"plain:1x{T},plain:1x1,ray:{T}x1,ray:1x{T},ray:1x1"
    configs = []
    for c in dict.fromkeys(spec.split(",")):  # ordered, no repeats
        kind, at = c.split(":")
        a, t = (int(x) for x in at.split("x"))
        configs.append((kind, a, t))
    results = []
    for kind, a, t in configs:
        label = f"plain {t} thr" if kind == "plain" else f"ray {a} actor(s) × {t} thr"
        print(f"-- {label} ({common.load_line()})", flush=True)
        if kind == "plain":
            r = plain_loop(model_dir, shards, t, args.batch_rows, args.micro, args.max_len)
        else:
            r = ray_pool(model_dir, shards, a, t, args.batch_rows, args.micro, args.max_len, work,
                         f"a{a}t{t}")
            if r["rows"] != r["expected"]:
                raise RuntimeError(f"{label}: {r['rows']} rows scored, expected {r['expected']}")
            print(f"   actors started {r['actors_started']}, used {r['actors_used']}: " + ", ".join(
                f"pid {p}: {v['rows']} rows, busy {v['busy_s']:.1f}s, {v['threads']} thr"
                for p, v in r["per_actor"].items()))
        r["label"] = label
        results.append(r)
        print(f"   wall {r['wall_s']:.1f}s, load {r['load_s']:.1f}s, scoring {r['score_s']:.1f}s", flush=True)

    base = results[0]
    one = next((r for r in results if r["label"] == "plain 1 thr"), base)
    ok_ids = [k for k, v in base["ce"].items() if v is not None and np.isfinite(v)]
    lines = ["", f"rows {len(msgs)}, tokens/row {tbar['ce']:.1f} (ce pass); {common.load_line()}", "",
             f"| configuration | scoring s (excl. load) | rows/s | tokens/s | ratio vs {base['label']} | "
             f"ratio vs {one['label']} | end-to-end wall s | wall ratio vs {base['label']} | model load s | "
             "max abs Δce vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rps = r["rows"] / r["score_s"]
        diff = max(abs(r["ce"][k] - base["ce"][k]) for k in ok_ids)
        lines.append(f"| {r['label']} | {r['score_s']:.1f} | {rps:.1f} | {rps * tbar['ce']:,.0f} | "
                     f"{base['score_s'] / r['score_s']:.2f}× | {one['score_s'] / r['score_s']:.2f}× | "
                     f"{r['wall_s']:.1f} | {base['wall_s'] / r['wall_s']:.2f}× | {r['load_s']:.2f} | {diff:.1e} |")
    best = max((r for r in results if r["label"].startswith("plain")), key=lambda r: r["rows"] / r["score_s"])
    lines += cost_model(best["rows"] / best["score_s"], tbar)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
