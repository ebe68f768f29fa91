"""Load a local HF causal-LM directory and its tokenizer.

No remote code unless the user sets ``trust_remote_code``; weights are read from
safetensors when present. The tiny test models go through exactly this path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelPathError(ValueError):
    pass


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelPathError(f"model directory does not exist: {p}")
    if not (p / "config.json").exists():
        raise ModelPathError(f"{p} has no config.json: not an HF model directory")
    return p


def resolve_dtype(dtype: DType, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, fp32 on CPU (CPU bf16 matmuls are slow)."""
    if dtype == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, padding_side: str = "right",
                   template: str = "auto"):
    """The tokenizer of a local directory with the chat template ``template`` resolves to
    (``model.template``: see :func:`effsft.corpus.tokenize.use_template`) installed on it."""
    from transformers import AutoTokenizer

    from effsft.corpus.tokenize import use_template

    if not Path(path).is_dir():
        raise ModelPathError(f"tokenizer directory does not exist: {path}")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Why eos: pad positions are masked out of every loss, so any id works; eos is common.
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return use_template(tok, template)


def load_model(path: str | os.PathLike, dtype: DType = "auto", device: str | torch.device = "cpu",
               trust_remote_code: bool = False, attn_implementation: str | None = None):
    """An ``AutoModelForCausalLM`` from a local directory, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    kwargs = {"dtype": resolve_dtype(dtype, device), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    return model.to(device).eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(spec) -> dict:
    """A manifest's ``inputs.model``: path, fingerprint and the template the job used.

    Args:
        spec: a :class:`effsft.config.ModelSpec` (or its dict).
    """
    from effsft.corpus.tokenize import template_info
    from effsft.report.manifest import fingerprint

    s = spec if isinstance(spec, dict) else spec.model_dump()
    tok = load_tokenizer(s["path"], trust_remote_code=s["trust_remote_code"], template=s["template"])
    return {"path": s["path"], "fingerprint": fingerprint(s["path"]), **template_info(tok)}


def stop_token_ids(model, tokenizer) -> list[int]:
    """Generation stops at any of these: the model's ``generation_config.eos_token_id`` (one id
    or several, e.g. a chat model's end-of-turn) and the tokenizer's eos."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = gen if isinstance(gen, (list, tuple)) else [gen]
    return sorted({int(i) for i in ids if i is not None} | (
        {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()))
