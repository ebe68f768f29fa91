"""Recipes ``effsft synth`` and ``effsft prepare``."""
from __future__ import annotations

import logging

from pydantic import Field, model_validator

from effsft.config import CorpusSpec, OutputPath, Strict, to_dict
from effsft.runtime import OutputDir, init_ray, timed

log = logging.getLogger("effsft.corpus")


class SynthConfig(Strict):
    """``effsft synth``: a synthetic instruction corpus with labelled noise (see synth.py)."""

    output: OutputPath
    rows: int = Field(20_000, gt=0)
    noise: float = Field(0.1, ge=0, le=1)
    dup: float = Field(0.05, ge=0, le=1)
    garbage: float = Field(0.0, ge=0, le=1)
    length_spread: int = Field(4, ge=0)
    task_mix: dict[str, float] = Field(default_factory=lambda: {"arith": 1.0, "string": 1.0, "fact": 1.0,
                                                                  "count": 1.0, "format": 1.0})
    eval_rows: int = Field(500, ge=0)
    grpo_rows: int = Field(500, ge=0)
    n_entities: int = Field(200, gt=1)
    seed: int = 0
    shard_rows: int = Field(50_000, gt=0)
    overwrite: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _check(self):
        from effsft.corpus.synth import TASKS

        unknown = set(self.task_mix) - set(TASKS)
        if unknown:
            raise ValueError(f"task_mix: unknown task(s) {sorted(unknown)}; known: {list(TASKS)}")
        if self.noise + self.dup + self.garbage > 1:
            raise ValueError("noise + dup + garbage must not exceed 1")
        return self


def run_synth(cfg: SynthConfig) -> dict:
    from effsft.corpus.synth import SynthSettings, write_synth
    from effsft.report.manifest import write_manifest

    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    timings: dict = {}
    settings = SynthSettings(**{k: v for k, v in cfg.model_dump().items()
                                if k not in ("output", "overwrite", "progress")})
    with timed(timings, "generate"):
        res = write_synth(settings, work, progress=cfg.progress)
    write_manifest(work, "synth", to_dict(cfg), counts=res["counts"], timings=timings)
    out.commit()
    log.info("synth: %s -> %s", res["counts"], out.final)
    return {"output": str(out.final), **res["counts"]}


class PrepareConfig(Strict):
    """``effsft prepare``: normalise any corpus into canonical shards + rejects."""

    input: CorpusSpec
    output: OutputPath
    overwrite: bool = False
    num_cpus: float = Field(0.5, gt=0)


def run_prepare(cfg: PrepareConfig) -> dict:
    from effsft.corpus.normalize import NormalizeOptions
    from effsft.corpus.prepare import prepare_corpus
    from effsft.report.manifest import fingerprint, write_manifest

    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    timings: dict = {}
    ray_desc = init_ray()
    opts = NormalizeOptions.of(cfg.input)
    with timed(timings, "fingerprint"):
        fp = fingerprint(cfg.input.path, options=(opts, cfg.input.split))
    with timed(timings, "prepare"):
        counts = prepare_corpus(cfg.input.path, work, opts=opts, shard_rows=cfg.input.shard_rows,
                                split=cfg.input.split, num_cpus=cfg.num_cpus)
    write_manifest(work, "prepare", to_dict(cfg), inputs={"corpus": {"path": cfg.input.path,
                   "fingerprint": fp}}, counts=counts.as_dict(), timings=timings,
                   extra={"ray": {"mode": ray_desc["mode"]}})
    out.commit()
    return {"output": str(out.final), **counts.as_dict()}
