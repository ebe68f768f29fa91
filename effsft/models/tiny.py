"""Tiny Llama-/Qwen2-family models with an offline tokenizer, saved as ordinary HF directories.

Why: no model hub here. Tests and demos build a byte-level BPE on the synthetic corpus and a
small random model from a config, save both with ``save_pretrained`` (safetensors), and then
load them through ``effsft.models.loading`` exactly as a real model directory would be.
Deterministic for a seed (same files, same bytes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Literal

import torch

from effsft.corpus.tokenize import DEFAULT_CHAT_TEMPLATE

Family = Literal["llama", "qwen2"]

SIZES = {
    # name: hidden, layers, heads, kv_heads, intermediate
    "tiny": (64, 2, 4, 2, 128),
    "small": (256, 4, 4, 2, 688),
    "base": (512, 8, 8, 4, 1376),
}
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``texts``; digits stay single tokens (SelectIT needs "1".."5")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # Digits split individually: arithmetic stays learnable and digit tokens are single ids.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL["pad"],
                                   bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"])
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def model_config(family: Family, vocab_size: int, size: str = "tiny", max_position: int = 1024,
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    hidden, layers, heads, kv, inter = SIZES[size]
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                  max_position_embeddings=max_position, pad_token_id=pad_id, bos_token_id=bos_id,
                  eos_token_id=eos_id, tie_word_embeddings=False, attention_dropout=0.0)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"family must be llama or qwen2, got {family!r}")


def build_tiny_model(family: Family, tokenizer, seed: int = 0, size: str = "tiny", **overrides):
    from transformers import AutoModelForCausalLM

    cfg = model_config(family, len(tokenizer), size, pad_id=tokenizer.pad_token_id,
                       bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def corpus_texts(corpus: str | os.PathLike, limit: int = 20_000) -> list[str]:
    """Text for tokenizer training: the first ``limit`` rows of a synthetic/canonical corpus."""
    import pyarrow.parquet as pq

    from effsft.corpus.readers import resolve_files

    texts: list[str] = []
    for f in resolve_files(Path(corpus) / "train" if (Path(corpus) / "train").is_dir() else corpus):
        if not f.endswith(".parquet"):
            continue
        for msgs in pq.read_table(f, columns=["messages"]).column("messages").to_pylist():
            texts.append("\n".join(m["content"] or "" for m in (msgs or [])))
            if len(texts) >= limit:
                return texts
    return texts


def write_tiny_model(out_dir: str | os.PathLike, family: Family = "llama", corpus: str | None = None,
                     texts: Iterable[str] | None = None, seed: int = 0, size: str = "tiny",
                     vocab_size: int = 512, **overrides) -> Path:
    """Build tokenizer + model and save them as an HF directory (safetensors)."""
    if texts is None:
        if corpus is None:
            raise ValueError("give a corpus directory or texts to train the tokenizer on")
        texts = corpus_texts(corpus)
    tok = build_tokenizer(list(texts), vocab_size=vocab_size)
    model = build_tiny_model(family, tok, seed=seed, size=size, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
