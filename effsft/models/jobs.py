"""Recipe ``effsft tiny-model``: a tiny Llama/Qwen2 model + offline tokenizer as an HF dir."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from effsft.config import ExistingPath, OutputPath, Strict, to_dict
from effsft.runtime import OutputDir


class TinyModelConfig(Strict):
    output: OutputPath
    family: Literal["llama", "qwen2"] = "llama"
    corpus: ExistingPath                       # synthetic/canonical corpus to train the BPE on
    size: Literal["tiny", "small", "base"] = "tiny"
    vocab_size: int = Field(512, ge=300)
    max_position: int = Field(1024, gt=16)
    seed: int = 0
    overwrite: bool = False


def run_tiny_model(cfg: TinyModelConfig) -> dict:
    from effsft.models.loading import count_params
    from effsft.models.tiny import write_tiny_model
    from effsft.report.manifest import write_manifest

    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    write_tiny_model(work, cfg.family, corpus=cfg.corpus, seed=cfg.seed, size=cfg.size,
                     vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position)
    from effsft.models.loading import load_model

    n = count_params(load_model(work))
    write_manifest(work, "tiny-model", to_dict(cfg), counts={"parameters": n})
    out.commit()
    return {"output": str(out.final), "parameters": n}
