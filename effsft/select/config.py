"""The ``effsft select`` config: method and score names, the sections of the YAML and
:class:`SelectConfig`, and :data:`PLANS`, what each method needs (scores, embeddings, clusters)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import Field, model_validator

from effsft.config import CorpusSpec, ModelSpec, OutputPath, Strict

SCORES = ("length", "ce", "ppl", "entropy", "ifd", "selectit", "less")
METHODS = ("random", "random_stratified", "zip", "diverseevol", "kmeans") + SCORES + tuple(
    f"km_{s}" for s in SCORES)
# Default ranking direction per score (written into the manifest).
DESCENDING = {"length": True, "ce": True, "ppl": True, "entropy": True, "ifd": True, "selectit": True,
               "less": True}
LM_SCORES = ("ce", "ppl", "entropy", "ifd", "selectit")


@dataclass(frozen=True)
class MethodPlan:
    """What a method needs before its selection rule runs, read from its name."""

    name: str
    score: Optional[str]  # the per-row score it ranks by (one of SCORES); None: random, zip, diverseevol, kmeans
    embedding: bool       # row embeddings: kmeans, km_*, diverseevol
    clusters: bool        # k-means clusters: kmeans, km_*

    @classmethod
    def of(cls, method: str) -> MethodPlan:
        base = method[3:] if method.startswith("km_") else method
        clusters = method.startswith("km_") or method == "kmeans"
        return cls(method, base if base in SCORES else None, clusters or method == "diverseevol", clusters)

    @property
    def scorers(self) -> tuple[str, ...]:
        """The scorer pools to run, in order: the score's, ``emb``, ``zip_g`` (ZIP's per-row g)."""
        return ((self.score,) if self.score is not None else ()) + (("emb",) if self.embedding else ()) + (
            ("zip_g",) if self.name == "zip" else ())


PLANS = {m: MethodPlan.of(m) for m in METHODS}


class ScorerSection(Strict):
    concurrency: int = Field(1, ge=1)       # actors per scorer pool
    num_cpus: float = Field(0.5, gt=0)      # per actor (fractional: see ray_notes.md)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(256, gt=0)      # rows per actor call
    micro_batch_size: int = Field(8, gt=0)  # rows per forward (length-sorted inside a call)
    packing: bool = False                   # LM scorers: padding-free packed forwards (same scores)
    max_len: int = Field(4096, gt=8)
    threads: Optional[int] = None           # torch threads per actor


class LengthSection(Strict):
    field: Literal["total", "prompt", "response"] = "total"
    order: Literal["longest", "shortest"] = "longest"


class EmbedSection(Strict):
    kind: Literal["lexical", "sentence_transformers", "lm"] = "lexical"
    path: Optional[str] = None              # sentence-transformers dir (default: MiniLM package)
    dim: int = Field(64, gt=1)              # lexical embedder only
    max_len: int = Field(512, gt=8)


class KMeansSection(Strict):
    k: Optional[int] = Field(None, gt=0)    # default min(1000, B // 10)
    niter: int = Field(25, gt=0)
    spherical: bool = True                  # embeddings are L2-normalised
    sample_rows: int = Field(256_000, gt=0)


class KCenterSection(Strict):
    variant: Literal["topn", "greedy"] = "topn"   # topn is the paper's
    init_fraction: float = Field(0.1, gt=0, lt=1)  # |S_0| / B, seeded random
    rounds: int = Field(3, ge=1)                    # topn rounds after S_0


class ZipSection(Strict):
    mode: Literal["exact", "window"] = "exact"
    k1: int = Field(10_000, gt=0)
    k2: int = Field(200, gt=0)
    k3: int = Field(100, gt=0)
    ser: Literal["reference", "text"] = "reference"
    workers: int = Field(2, ge=1)           # processes for the candidate scoring


class SelectITSection(Strict):
    models: list[str] = Field(default_factory=list)  # rating models; default: model.path
    alpha: float = Field(0.2, ge=0)
    max_tokens: int = Field(8192, gt=8)


class LessLoraSection(Strict):
    r: int = Field(128, ge=1)
    alpha: float = Field(512, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class LessSection(Strict):
    """LESS (docs/algorithms/data_selection.md §2.2): warm-up on a seeded slice, then gradient features per checkpoint."""

    warmup_fraction: float = Field(0.05, gt=0, le=1)  # of the usable rows, the smallest r(id)
    epochs: int = Field(4, ge=1)                      # one checkpoint per epoch
    lr: float = Field(2e-5, gt=0)                     # linear decay after warmup_ratio of the steps
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    max_len: int = Field(2048, gt=8)
    lora: LessLoraSection = LessLoraSection()
    proj_dim: int = Field(8192, ge=1)
    proj_seed: int = 0
    target: str = "holdout"                 # "holdout" (a seeded slice of the pool) or a corpus path
    target_rows: int = Field(256, ge=1)     # holdout size / rows read from the target corpus
    subtask_key: Optional[str] = None       # meta key grouping target rows; null = one group
    grad_method: Literal["vmap", "loop"] = "vmap"


class FaultSection(Strict):
    kill_actor_after_batches: Optional[int] = None
    stop_after_shards: Optional[int] = None
    hold_after_shards: Optional[int] = None   # tests: the driver waits there once, to be signalled


class SelectConfig(Strict):
    """``effsft select``: choose ``budget`` rows of ``input`` with ``method``."""

    input: CorpusSpec
    output: OutputPath
    method: str
    budget: float = Field(gt=0)          # a row count (>= 1) or a fraction of the good rows (< 1)
    seed: int = 0
    model: Optional[ModelSpec] = None    # tokenizer / scoring LM
    cache_dir: Optional[OutputPath] = None      # default: <output's parent>/_effsft_cache
    direction: Optional[Literal["descending", "ascending"]] = None
    stratify_by: str = "task"            # meta key for random_stratified
    scorer: ScorerSection = ScorerSection()
    length: LengthSection = LengthSection()
    ifd_drop_gt1: bool = True
    embed: EmbedSection = EmbedSection()
    kmeans: KMeansSection = KMeansSection()
    kcenter: KCenterSection = KCenterSection()
    zip: ZipSection = ZipSection()
    selectit: SelectITSection = SelectITSection()
    less: LessSection = LessSection()
    fault: FaultSection = FaultSection()
    plots: bool = True
    overwrite: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget >= 1 and self.budget != int(self.budget):
            raise ValueError("budget: a count must be an integer (or give a fraction < 1)")
        plan = self.plan
        needs_model = (plan.score is not None and plan.score != "selectit") or (
            plan.embedding and self.embed.kind == "lm")
        if needs_model and self.model is None:
            raise ValueError(f"model: method {self.method!r} needs model.path (tokenizer / scoring LM)")
        if plan.score == "selectit" and not (self.selectit.models or self.model):
            raise ValueError("selectit.models: give rating models (or model.path)")
        return self

    @property
    def plan(self) -> MethodPlan:
        """What :attr:`method` needs: its score, embeddings, clusters and scorer pools."""
        return PLANS[self.method]
