"""The ``effsft prune`` config schema (``jobs/prune.yaml``): the ``prune.*`` section, the
``sweep`` grid and the job's top-level keys, plus the demo's prune-stage config data."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from typing_extensions import Annotated

from effsft.config import CorpusSpec, ModelSpec, OutputPath, Strict

Method = Literal["dlp", "owl", "uniform"]
Criterion = Literal["wanda", "sparsegpt", "magnitude"]
Stat = Literal["median", "mean"]
Sparsity = Annotated[float, Field(ge=0.01, le=0.99)]


def _nm_from_yaml(v):
    """Why: YAML 1.1 reads an unquoted ``2:4`` as the base-60 integer 124 (``nm=2:4`` on the
    command line included); map such an integer back to ``"N:M"``."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 60:
        return "{}:{}".format(*divmod(v, 60))
    return v


NM = Annotated[Optional[str], BeforeValidator(_nm_from_yaml)]


class OwlSpec(Strict):
    """OWL settings (``prune.owl``): outlier threshold ``M`` and band half-width ``lambda``."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              populate_by_name=True, serialize_by_alias=True)

    M: float = Field(5.0, gt=0)
    lam: float = Field(0.08, ge=0, alias="lambda")


class SparseGPTSpec(Strict):
    blocksize: int = Field(128, gt=0)
    percdamp: float = Field(0.01, gt=0)


class CalibSpec(Strict):
    """Calibration windows: ``n_samples`` windows of ``min(seqlen, max_position_embeddings)``."""

    data: CorpusSpec
    n_samples: int = Field(128, gt=0)
    seqlen: int = Field(2048, gt=1)
    seed: int = 0
    max_docs: int = Field(20_000, gt=0)       # documents read from the corpus to sample from


class EvalSpec(Strict):
    """Perplexity windows (non-overlapping, same length as the calibration windows)."""

    data: Optional[CorpusSpec] = None         # None: held-out documents of prune.calib.data
    n_windows: int = Field(32, gt=0)
    max_docs: int = Field(2000, gt=0)


class PruneSection(Strict):
    method: Method = "dlp"
    criterion: Criterion = "wanda"
    sparsity: Sparsity = 0.7
    alpha: float = Field(0.15, ge=0, le=0.5)
    stat: Stat = "median"
    nm: NM = None                             # "2:4" | "4:8": uniform N:M (overrides method, s)
    owl: OwlSpec = OwlSpec()
    median_approx: bool = False
    calib: CalibSpec
    eval: EvalSpec = EvalSpec()
    device: str = "auto"                      # auto (cuda when visible to the task) | cpu | cuda[:i]
    batch_size: int = Field(8, gt=0)          # windows per block forward
    sparsegpt: SparseGPTSpec = SparseGPTSpec()
    # How a document becomes text: chat = the conversation through the model's template (the
    # one rule of every job); plain = its turns' contents joined by blank lines (prose corpora).
    render: Literal["chat", "plain"] = "chat"

    @field_validator("nm")
    @classmethod
    def _check_nm(cls, v):
        from effsft.prune.criteria import parse_nm

        parse_nm(v)  # its ValueError names the problem; pydantic adds the key
        return v


class SweepSpec(Strict):
    """Grid of configurations; a missing list means ``[prune.<key>]``. ``stat`` and ``alpha``
    only vary DLP."""

    sparsity: Optional[list[Sparsity]] = None
    method: Optional[list[Method]] = None
    criterion: Optional[list[Criterion]] = None
    stat: Optional[list[Stat]] = None
    alpha: Optional[list[Annotated[float, Field(ge=0, le=0.5)]]] = None
    save_models: bool = False                 # a pruned model/ per configuration
    max_parallel: Optional[int] = Field(None, gt=0)  # tasks in flight (None: as Ray schedules)


class PruneConfig(Strict):
    """``effsft prune``: one pruning run, or a sweep of runs with a comparison table."""

    model: ModelSpec
    output: OutputPath
    prune: PruneSection
    sweep: Optional[SweepSpec] = None
    save_model: bool = True                   # single run: write the pruned model/
    num_gpus: Optional[float] = Field(None, ge=0)  # None: 1 if the cluster has GPUs, else 0
    num_cpus: float = Field(1, gt=0)
    overwrite: bool = False

    @field_validator("sweep")
    @classmethod
    def _check_sweep(cls, v, info: ValidationInfo):
        prune = info.data.get("prune")
        if v is not None and prune is not None and prune.nm is not None:
            raise ValueError("cannot be combined with prune.nm (N:M fixes method and sparsity)")
        return v


def demo_config(model_dir: str, corpus_dir: str, output: str, sparsity: float = 0.5) -> dict:
    """Config data for the demo's prune stage (tiny model, small calibration; needs >= 300
    good rows in ``corpus_dir``: 200 for calibration, the next 100 held out for perplexity).

    ``effsft.demo`` can run it as ``_stage("prune", out, PruneConfig, run_prune,
    demo_config(model, prepared / "data", out / "prune"), summary)``.
    """
    return {"model": {"path": str(model_dir)}, "output": str(output),
            "prune": {"method": "dlp", "criterion": "wanda", "sparsity": sparsity, "stat": "median",
                      "calib": {"data": {"path": str(corpus_dir)}, "n_samples": 16, "seqlen": 128,
                                "max_docs": 200},
                      "eval": {"n_windows": 8, "max_docs": 100}, "batch_size": 8}}
