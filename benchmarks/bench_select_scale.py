"""``effsft select`` at scale: wall time, stage timings and peak memory per method.

    PYTHONPATH=. python benchmarks/bench_select_scale.py --rows 1000000 --workdir /data/selscale
    PYTHONPATH=. python benchmarks/bench_select_scale.py --quick            # 20k rows, < 2 min

Generates the synthetic corpus (or reuses ``--corpus DIR``, a directory of Parquet/JSONL
shards), prepares it ONCE (its own row in the table), then runs ``run_select`` for
``random``, ``length``, ``zip`` (window mode, ``zip.workers=2``, budget ``--zip-budget``) and
``km_length`` (lexical embedder). Each method gets its own score cache (so ``km_length`` pays
for its length scoring: end-to-end numbers) with the prepared corpus linked in.

Memory: a thread samples every 0.5 s the driver's RSS and the sum of RSS over all of the
driver's descendant processes (Ray GCS/raylet, Ray workers and actors, the ZIP process
pool); "peak total" is the peak of driver + descendants. RSS counts shared pages (the object
store's shared memory, mapped libraries) once per process, so the total is an upper bound.
Ray itself is started once before the first row; its idle footprint is printed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import common


class MemSampler:
    """Peak RSS of this process and of this process + all descendants, sampled in a thread."""

    def __init__(self, period: float = 0.5):
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.peak_driver = self.peak_total = self.peak_workers = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int, int]:
        """(driver, driver + descendants, Ray worker processes only) RSS in bytes."""
        import psutil

        drv = self.proc.memory_info().rss
        total, workers = drv, 0
        for c in self.proc.children(recursive=True):
            try:
                rss = c.memory_info().rss
                total += rss
                if c.name().startswith("ray::") or "default_worker.py" in " ".join(c.cmdline()[:3]):
                    workers += rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return drv, total, workers

    def _run(self) -> None:
        while not self._stop.is_set():
            d, t, w = self.sample()
            self.peak_driver, self.peak_total = max(self.peak_driver, d), max(self.peak_total, t)
            self.peak_workers = max(self.peak_workers, w)
            self._stop.wait(self.period)

    def __enter__(self) -> "MemSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def mb(x: int) -> str:
    return f"{x / 2**20:,.0f}"


def base_config(args, corpus_train: Path, model_dir: Path, work: Path, method: str) -> dict:
    budget = args.zip_budget if method == "zip" else args.budget
    return {"input": {"path": str(corpus_train), "shard_rows": args.shard_rows}, "method": method,
            "budget": budget, "seed": 0, "model": {"path": str(model_dir)},
            "output": str(work / "out" / method), "cache_dir": str(work / f"cache-{method}"),
            "scorer": {"concurrency": args.concurrency, "batch_size": 1024},
            "zip": {"mode": "window", "workers": 2, "k1": args.zip_k1, "k2": args.zip_k2, "k3": args.zip_k3},
            "embed": {"kind": "lexical"}, "plots": False, "overwrite": True}


def main() -> None:
    common.set_env_defaults(ray=True, RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="300")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--corpus", default=None, help="existing corpus dir (Parquet/JSONL shards); skips synth")
    ap.add_argument("--shard-rows", type=int, default=50_000, help="canonical shard size (input.shard_rows)")
    ap.add_argument("--budget", type=int, default=10_000)
    ap.add_argument("--zip-budget", type=int, default=10_000)
    ap.add_argument("--zip-k1", type=int, default=10_000)
    ap.add_argument("--zip-k2", type=int, default=200)
    ap.add_argument("--zip-k3", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=2, help="scorer actors (scorer.concurrency)")
    ap.add_argument("--methods", default="random,length,zip,km_length")
    ap.add_argument("--workdir", default=None, help="keep corpus/model/outputs here (default: temp dir)")
    ap.add_argument("--quick", action="store_true",
                    help="20k rows in 5k-row shards, budget 1000, zip budget 1000 / k1 2000 (< 2 min)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.shard_rows, args.budget = 20_000, 5_000, 1000
        args.zip_budget, args.zip_k1, args.zip_k2, args.zip_k3 = 1000, 2000, 200, 100
    with common.work_dir(args.workdir, "selbench-scale-") as work:
        measure(args, work)


def measure(args, work: Path) -> None:
    print(common.machine_line())

    from effsft.config import build_config
    from effsft.select.config import SelectConfig
    from effsft.select.recipe import run_select
    from effsft.select.shards import prepare

    if args.corpus:
        corpus_train = Path(args.corpus)
        tok_src = corpus_train
    else:
        syn = common.make_corpus(work / f"synth-{args.rows}", args.rows, min(args.shard_rows, 50_000))
        corpus_train, tok_src = syn / "train", syn
    model_dir = common.tiny_model(work / "model-tiny", tok_src, size="tiny")  # tokenizer for length
    common.init_local_ray()
    with MemSampler() as idle:
        time.sleep(1.0)
    print(f"Ray started: idle driver {mb(idle.peak_driver)} MB, driver + Ray processes "
          f"{mb(idle.peak_total)} MB; {common.load_line()}")

    rows = []
    # Stage 1 once: prepare into a shared cache; every method's cache links to it.
    shared = work / "cache-shared"
    cfg0 = build_config(SelectConfig, base_config(args, corpus_train, model_dir, work, "random"))
    timings: dict = {}
    t0 = time.perf_counter()
    with MemSampler() as m:
        corpus_dir, counts, _ = prepare(cfg0, shared, timings)
    rows.append({"step": "prepare (once, cached)", "wall_s": time.perf_counter() - t0, "stages": timings,
                 "driver": m.peak_driver, "total": m.peak_total, "workers": m.peak_workers,
                 "note": f"{counts['rows_ok']:,} rows ok, {counts['rows_rejected']} rejected"})
    print(f"prepare: {rows[-1]['wall_s']:.1f}s {timings} ({common.load_line()})", flush=True)

    for method in args.methods.split(","):
        data = base_config(args, corpus_train, model_dir, work, method)
        cache = Path(data["cache_dir"])
        if cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(parents=True)
        (cache / corpus_dir.name).symlink_to(corpus_dir)  # prepared once, reused
        cfg = build_config(SelectConfig, data)
        t0 = time.perf_counter()
        with MemSampler() as m:
            res = run_select(cfg)
        wall = time.perf_counter() - t0
        man = json.loads((Path(res["output"]) / "manifest.json").read_text())
        st = {k: v for k, v in man["timings_s"].items() if k != "total"}
        rps = {k: round(v.get("rows_per_s", 0.0), 1) for k, v in man.get("scoring", {}).items()}
        rows.append({"step": f"{method} (budget {cfg.budget:,.0f})", "wall_s": wall, "stages": st,
                     "driver": m.peak_driver, "total": m.peak_total, "workers": m.peak_workers,
                     "note": ", ".join(f"{k}: {v} rows/s" for k, v in rps.items())})
        print(f"{method}: {wall:.1f}s {st} peak driver {mb(m.peak_driver)} MB total {mb(m.peak_total)} MB "
              f"({common.load_line()})", flush=True)

    print(f"\nrows {args.rows:,}, shards of {args.shard_rows:,}, scorer concurrency {args.concurrency}; "
          f"{common.load_line()}\n")
    print("| step | wall s | stage timings (manifest, s) | peak driver RSS MB | peak Ray workers RSS MB | "
          "peak total RSS MB | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        print(f"| {r['step']} | {r['wall_s']:.1f} | {st} | {mb(r['driver'])} | {mb(r['workers'])} | "
              f"{mb(r['total'])} | {r['note']} |")


if __name__ == "__main__":
    main()
