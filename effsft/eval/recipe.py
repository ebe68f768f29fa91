"""Recipe ``effsft eval``: perplexity on a corpus and exact-match accuracy on an eval split.

The model work runs in one Ray task (``num_gpus`` when the cluster has GPUs), so a driver on
a CPU-only head node still evaluates on a GPU worker.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from pydantic import Field, model_validator

from effsft.config import CorpusSpec, ExistingPath, ModelSpec, OutputPath, Strict, to_dict
from effsft.corpus.answer import AnswerSpec
from effsft.corpus.prepare import first_good_rows
from effsft.runtime import OutputDir, init_ray, timed

log = logging.getLogger("effsft.eval")


class EvalConfig(Strict):
    """``effsft eval``: at least one of ``data`` (perplexity) or ``eval_split`` (exact match)."""

    model: ModelSpec
    output: OutputPath
    data: Optional[CorpusSpec] = None          # corpus for response perplexity
    eval_split: Optional[ExistingPath] = None  # rows with messages + answer (synth eval.parquet)
    limit: int = Field(2000, gt=0)             # rows used from each input
    max_len: int = Field(512, gt=8)
    batch_size: int = Field(16, gt=0)
    packing: bool = False                      # perplexity on padding-free packed batches (same numbers)
    max_new_tokens: int = Field(64, gt=0)
    answer: AnswerSpec = AnswerSpec()          # exact match: how the answer is found and compared
    also: List[AnswerSpec] = []                # more rules scored on the same generations (reported beside)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0)
    overwrite: bool = False

    @model_validator(mode="after")
    def _need_input(self):
        if self.data is None and self.eval_split is None:
            raise ValueError("data / eval_split: give at least one")
        return self


def _eval_rows(path: str, limit: int) -> list[dict]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    missing = {"messages", "answer"} - set(t.column_names)
    if missing:
        raise ValueError(f"eval_split {path} lacks columns {sorted(missing)}")
    return t.slice(0, limit).to_pylist()


def evaluate(model_spec: dict, ppl_rows: list | None, em_rows: list | None, max_len: int,
             batch_size: int, max_new_tokens: int, rule=None, also=(), packing: bool = False) -> dict:
    """The model work (runs inside a Ray task)."""
    import torch

    from effsft.eval.metrics import exact_match, perplexity
    from effsft.models.loading import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(model_spec["path"], trust_remote_code=model_spec["trust_remote_code"],
                         template=model_spec["template"])
    model = load_model(model_spec["path"], dtype=model_spec["dtype"], device=device,
                       trust_remote_code=model_spec["trust_remote_code"],
                       attn_implementation=model_spec["attn_implementation"])
    res: dict = {"device": device}
    if ppl_rows:
        res["perplexity"] = perplexity(model, tok, [r["messages"] for r in ppl_rows], max_len,
                                       batch_size, packing=packing)
    if em_rows:
        res["exact_match"] = exact_match(model, tok, em_rows, max_new_tokens, batch_size, rule=rule,
                                         also=also)
    return res


def run_eval(cfg: EvalConfig) -> dict:
    import ray

    from effsft.models.loading import describe_model
    from effsft.report.manifest import fingerprint, write_manifest
    from effsft.report.plots import write_report

    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    init_ray()
    timings: dict = {}
    with timed(timings, "read"):
        ppl_rows, unreadable = first_good_rows(cfg.data, cfg.limit) if cfg.data else (None, [])
        em_rows = _eval_rows(cfg.eval_split, cfg.limit) if cfg.eval_split else None
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(evaluate)
    with timed(timings, "evaluate"):
        res = ray.get(task.remote(cfg.model.model_dump(), ppl_rows, em_rows, cfg.max_len,
                                  cfg.batch_size, cfg.max_new_tokens, cfg.answer.rule(),
                                  [a.rule() for a in cfg.also], cfg.packing))
    inputs = {"model": describe_model(cfg.model)}
    if cfg.data:
        inputs["data"] = {"path": cfg.data.path}
    if cfg.eval_split:
        inputs["eval_split"] = {"path": cfg.eval_split, "fingerprint": fingerprint(cfg.eval_split)}
    if unreadable:
        log.warning("eval: unreadable files in data.path (skipped, listed in the manifest): %s",
                    [u["file"] for u in unreadable])
    write_manifest(work, "eval", to_dict(cfg), inputs=inputs, metrics=res, timings=timings,
                   counts={"unreadable_files": unreadable} if cfg.data else None)
    sections = []
    if "perplexity" in res:
        p = res["perplexity"]
        sections.append(("Perplexity (response tokens)",
                         f"ppl **{p['ppl']:.4g}** (mean NLL {p['mean_nll']:.4f}) over {p['rows']} rows, "
                         f"{p['tokens']} tokens; {p['too_long']} rows too long for max_len={cfg.max_len}."))
    if "exact_match" in res:
        em = res["exact_match"]
        rules = [em["rule"], *em["also"]]
        per = [em["per_task"], *[a["per_task"] for a in em["also"].values()]]
        lines = [f"accuracy **{em['accuracy']:.3f}** on {em['n']} rows (answer rule `{em['rule']}`)", "",
                 "| task | " + " | ".join(f"`{r}`" for r in rules) + " |", "|---" * (1 + len(rules)) + "|"]
        lines += [f"| {t} | " + " | ".join(f"{p[t]:.3f}" for p in per) + " |" for t in em["per_task"]]
        lines += ["", "Samples:", ""] + [f"- `{s['prompt'][:80]}` -> `{s['generation'][:80]}` "
                                         f"(answer `{s['answer']}`, {'ok' if s['correct'] else 'wrong'})"
                                         for s in em["samples"][:5]]
        sections.append(("Exact match", "\n".join(lines)))
    write_report(work / "report.md", f"eval of {cfg.model.path}", sections)
    out.commit()
    return {"output": str(out.final), **{k: v for k, v in res.items() if k != "device"}}
