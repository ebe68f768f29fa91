"""Per-row scorers: callables that map a batch of canonical rows to score columns.

Each scorer is built once per actor (model loaded once) and called on Arrow batches with
``id`` and ``messages``; it returns ``id``, ``status`` and its columns (``score_<name>``
float64 with null for rows whose status is not ``ok``; ``emb`` fp16 bytes for embedders).
They hold no Ray code: ``effsft.select.pipeline`` runs them on actor pools.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from effsft.select.store import numpy_to_emb

STATUS_OK = "ok"


def _float_col(x: np.ndarray) -> pa.Array:
    x = np.asarray(x, np.float64)
    return pa.array(x, pa.float64(), mask=~np.isfinite(x))


def _messages(batch: pa.Table) -> list:
    return batch.column("messages").to_pylist()


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


class LengthScorer:
    """Prompt / response / total token counts with the target tokenizer (no model)."""

    columns = ("score_length_prompt", "score_length_response", "score_length_total")

    def __init__(self, model_path: str, trust_remote_code: bool = False, template: str = "auto", **_: Any):
        from effsft.models.loading import load_tokenizer

        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, template=template)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from effsft.select.lm_scores import length_scores

        s = length_scores(self.tok, _messages(batch))
        ok = s["total_tokens"] >= 0
        cols = {"id": batch.column("id"),
                "status": pa.array(np.where(ok, STATUS_OK, "bad_messages").tolist(), pa.string()),
                "n_tokens": pa.array(np.maximum(s["total_tokens"], 0), pa.int64())}
        for name, key in zip(self.columns, ("prompt_tokens", "response_tokens", "total_tokens")):
            cols[name] = _float_col(np.where(ok, s[key], np.nan))
        return pa.table(cols)


class LMScorer:
    """CE / PPL / entropy of the answer (and IFD: s(A|Q)/s(A)) with one causal LM."""

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto", max_len: int = 4096,
                 micro_batch_size: int = 8, ifd: bool = False, drop_gt1: bool = True,
                 trust_remote_code: bool = False, threads: int | None = None, template: str = "auto",
                 packing: bool = False, **_: Any):
        from effsft.models.loading import load_model, load_tokenizer

        _threads(threads)
        dev = _device(device)
        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, template=template)
        self.model = load_model(model_path, dtype=dtype, device=dev, trust_remote_code=trust_remote_code)
        self.kw = dict(max_len=max_len, batch_size=micro_batch_size, compute_ifd=ifd, drop_gt1=drop_gt1,
                       packing=packing)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from effsft.select.lm_scores import lm_score_rows

        with torch.no_grad():
            s = lm_score_rows(self.model, self.tok, _messages(batch), **self.kw)
        cols = {"id": batch.column("id"), "status": pa.array(list(s["status"]), pa.string()),
                "n_tokens": pa.array(s["n_tokens"], pa.int64())}
        for k in ("ce", "ppl", "entropy", "s_a", "ifd_raw", "ifd"):
            if k in s:
                cols[f"score_{k}"] = _float_col(s[k])
        return pa.table(cols)


class SelectITScorer:
    """Sentence-level SelectIT score of one rating model (model level is combined later)."""

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto", alpha: float = 0.2,
                 max_tokens: int = 8192, micro_batch_size: int = 8, trust_remote_code: bool = False,
                 threads: int | None = None, template: str = "auto", **_: Any):
        from effsft.models.loading import load_model, load_tokenizer

        _threads(threads)
        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, template=template)
        self.model = load_model(model_path, dtype=dtype, device=_device(device),
                                trust_remote_code=trust_remote_code)
        self.kw = dict(alpha=alpha, max_tokens=max_tokens, batch_size=micro_batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from effsft.select.selectit import selectit_score_rows

        with torch.no_grad():
            s = selectit_score_rows(self.model, self.tok, _messages(batch), **self.kw)
        return pa.table({"id": batch.column("id"), "status": pa.array(list(s["status"]), pa.string()),
                         "n_tokens": pa.array(np.zeros(batch.num_rows, np.int64)),
                         "score_selectit": _float_col(s["s_sent"])})


class ZipGScorer:
    """g(x) = C([x]): the zlib compression ratio of a row on its own (ZIP step 0)."""

    def __init__(self, ser: str = "reference", **_: Any):
        self.ser = ser

    def __call__(self, batch: pa.Table) -> pa.Table:
        from effsft.select.zip import g_scores, ser_format, serialize_rows

        rows = serialize_rows(_messages(batch), self.ser)
        g = g_scores(rows, ser_format(self.ser))
        return pa.table({"id": batch.column("id"),
                         "status": pa.array([STATUS_OK] * batch.num_rows, pa.string()),
                         "n_tokens": pa.array([len(r) for r in rows], pa.int64()),
                         "score_zip_g": _float_col(g)})


class EmbedScorer:
    """Row embeddings: ``lexical`` (hashed n-grams, CPU), ``sentence_transformers`` (a local
    directory, e.g. all-MiniLM-L6-v2), both on ``role: content`` text, or ``lm`` (masked mean of
    an LM's last hidden state over the conversation rendered with the job's template)."""

    def __init__(self, kind: str = "lexical", model_path: str | None = None, dim: int = 64, seed: int = 0,
                 device: str = "auto", max_len: int = 512, micro_batch_size: int = 32, dtype: str = "auto",
                 normalize: bool = True, trust_remote_code: bool = False, threads: int | None = None,
                 template: str = "auto", **_: Any):
        from effsft.select import embed

        _threads(threads)
        self.kind, self.max_len, self.mbs, self.normalize = kind, max_len, micro_batch_size, normalize
        if kind == "lexical":
            self.enc = embed.HashedNgramEmbedder(dim=dim, seed=seed)
        elif kind == "sentence_transformers":
            path = model_path or str(embed.find_minilm_dir())
            self.enc = embed.SentenceEmbedder(path, device=_device(device), batch_size=micro_batch_size)
        elif kind == "lm":
            from effsft.models.loading import load_model, load_tokenizer

            self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, template=template)
            self.model = load_model(model_path, dtype=dtype, device=_device(device),
                                    trust_remote_code=trust_remote_code)
        else:
            raise ValueError(f"embed kind must be lexical|sentence_transformers|lm, got {kind!r}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from effsft.select import embed

        if self.kind == "lm":
            import torch

            from effsft.corpus.tokenize import render

            # The LM sees the conversation as every other job renders it (the template rule).
            texts = [render(self.tok, m) for m in _messages(batch)]
            seqs = [(self.tok(t, add_special_tokens=False)["input_ids"][: self.max_len] or [0]) for t in texts]
            with torch.no_grad():
                x = embed.lm_embed(self.model, seqs, pad_id=self.tok.pad_token_id or 0,
                                   batch_size=self.mbs, normalize=self.normalize)
        else:
            texts = [embed.messages_to_text(m) for m in _messages(batch)]
            x = self.enc.encode(texts)
        return pa.table({"id": batch.column("id"),
                         "status": pa.array([STATUS_OK] * batch.num_rows, pa.string()),
                         "n_tokens": pa.array([len(t) for t in texts], pa.int64()),
                         "emb": numpy_to_emb(x)})


class LessScorer:
    """LESS at one warm-up checkpoint: per row, the mean cosine of its Adam-preconditioned,
    projected LoRA gradient with each target subtask (``less_sub``, a list of S floats, NaN
    when the row cannot be encoded). The driver combines checkpoints (docs/algorithms/data_selection.md §2.2)."""

    def __init__(self, model_path: str, checkpoint: str, lora_r: int, lora_alpha: float,
                 target_modules: list, proj_dim: int, proj_seed: int, projector_checksum: str,
                 max_len: int = 2048, micro_batch_size: int = 8, grad_method: str = "vmap",
                 device: str = "auto", trust_remote_code: bool = False, threads: int | None = None,
                 template: str = "auto", **_: Any):
        from effsft.models.loading import load_model, load_tokenizer
        from effsft.select import less

        _threads(threads)
        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, template=template)
        base = load_model(model_path, dtype="float32", device=_device(device), trust_remote_code=trust_remote_code)
        lora = less.LoraSettings(r=lora_r, alpha=lora_alpha, target_modules=tuple(target_modules))
        self.model, self.ckpt = less.load_checkpoint(base, checkpoint, lora)
        self.proj = less.RademacherProjector(len(self.ckpt.exp_avg), proj_dim, proj_seed)
        if self.proj.checksum != projector_checksum:
            raise RuntimeError(f"LESS projector checksum {self.proj.checksum} != {projector_checksum} "
                               "(another RNG stream on this machine?)")
        self.subtasks, self.means = less.load_target_means(checkpoint)
        self.kw = dict(max_len=max_len, micro_batch_size=micro_batch_size, method=grad_method)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from effsft.select import less

        feats, status = less.gradient_features(self.model, self.tok, _messages(batch), self.proj, self.ckpt,
                                               adam=True, **self.kw)
        sub = less.subtask_cosines(feats, self.means)  # [N, S], NaN rows stay NaN
        return pa.table({"id": batch.column("id"), "status": pa.array(status, pa.string()),
                         "n_tokens": pa.array(np.zeros(batch.num_rows, np.int64)),
                         "less_sub": pa.array(sub.tolist(), pa.list_(pa.float64()))})
