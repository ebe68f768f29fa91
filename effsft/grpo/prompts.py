"""The GRPO prompts (``data.*``): read through the corpus readers, filtered by task, chat-templated and
tokenised on the driver; every row not used is counted or rejected with its reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from effsft.config import ConfigError
from effsft.grpo.config import GRPOConfig

log = logging.getLogger("effsft.grpo")


@dataclass
class PromptSet:
    """Tokenised prompts (driver side) and the columns the reward functions receive."""

    ids: list                   # N token-id lists
    texts: list                 # N prompt strings (chat-templated)
    columns: dict               # column -> N values


MAX_PROMPT_ROW_BYTES = 1 << 20  # a prompt row larger than this is rejected (too_large)


def _prompt_messages(value) -> list[dict]:
    """A prompt cell -> chat messages (a trailing assistant turn, e.g. the reference answer, is
    dropped). Raises ``Reject`` for a cell that is neither a string nor a list of messages."""
    from effsft.corpus.normalize import Reject

    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise Reject("wrong_type", "the prompt is neither a string nor a list of {role, content} messages")
    return value[:-1] if value and value[-1]["role"] == "assistant" else list(value)


def read_prompts(cfg: GRPOConfig, rejects_path) -> tuple[PromptSet, dict]:
    """Read, filter and tokenise the prompts (chat template, as at eval time).

    ``data.path`` (a file or a directory of shards) goes through the corpus readers
    (JSONL/JSON/Parquet/Arrow, compressed or not); rows
    outside ``data.tasks`` are counted as filtered; beyond ``data.limit`` nothing is read; every
    other row is a prompt or a line of ``rejects_path`` with its reason (``prompts_in =
    prompts_ok + prompts_rejected``, checked).
    """
    from effsft.corpus.normalize import Reject, parse_object
    from effsft.corpus.readers import iter_raw_file, resolve_files
    from effsft.corpus.rejects import RejectsWriter
    from effsft.corpus.tokenize import encode_prompt, render
    from effsft.models.loading import load_tokenizer

    d = cfg.data
    tok = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                         template=cfg.model.template)
    ids, texts, kept, unreadable = [], [], [], []
    n_in = n_filtered = 0
    seen_column = seen_task = False
    with RejectsWriter(rejects_path) as rejects:
        def reject(f, r, why: Reject, raw=None):
            rejects.write(src_file=[f], src_row=[r], reason=[why.reason], detail=[why.detail],
                          raw=[raw])

        def raw_rows():
            for name in resolve_files(d.path):
                for block in iter_raw_file(name, d.on_unreadable):
                    yield from zip(block["raw"].to_pylist(), block["src_file"].to_pylist(),
                                   block["src_row"].to_pylist(), block["read_error"].to_pylist())

        for raw, f, r, read_error in raw_rows():
            if d.limit and n_in >= d.limit:
                break
            if read_error is not None:  # a file the reader could not read (from row r on)
                n_in += 1
                reject(f, r, Reject("unreadable_file", f"{f}: {read_error}"))
                unreadable.append({"file": f, "rows_read": r, "error": read_error})
                continue
            try:
                row = parse_object(raw, MAX_PROMPT_ROW_BYTES)
            except Reject as e:
                n_in += 1
                reject(f, r, e, raw)
                continue
            seen_task |= "task" in row
            if d.tasks is not None and row.get("task") not in d.tasks:
                n_filtered += 1
                continue
            n_in += 1
            seen_column |= d.prompt_column in row
            try:
                if row.get(d.prompt_column) is None:
                    raise Reject("missing_field", f"no {d.prompt_column!r} (data.prompt_column)")
                msgs = _prompt_messages(row[d.prompt_column])
                enc = encode_prompt(tok, msgs)
                if not enc:
                    raise Reject("empty_prompt", "the prompt has no tokens")
                if len(enc) > d.max_prompt_tokens:
                    raise Reject("too_long", f"{len(enc)} prompt tokens > data.max_prompt_tokens="
                                             f"{d.max_prompt_tokens}")
            except Reject as e:
                reject(f, r, e, raw)
                continue
            ids.append(enc)
            texts.append(render(tok, msgs, add_generation_prompt=True))
            kept.append(row)
    if d.tasks is not None and not seen_task:
        raise ConfigError(f"data.tasks: {d.path} has no 'task' column")
    if n_in and not seen_column:
        raise ConfigError(f"data.prompt_column: {d.path} has no column {d.prompt_column!r}")
    if not ids:
        raise ConfigError(f"data.path: no usable prompts in {d.path} (after tasks/limit/max_prompt_tokens; "
                          f"rejected by reason: {dict(rejects.by_reason)})")
    if n_in != len(ids) + rejects.rows:
        raise RuntimeError(f"prompts lost: {n_in} in, {len(ids)} ok, {rejects.rows} rejected")
    extra = sorted({k for row in kept for k in row} - {d.prompt_column, "id"})
    cols = {c: [row.get(c) for row in kept] for c in extra}
    counts = {"prompts_in": n_in, "prompts_ok": len(ids), "prompts_rejected": rejects.rows,
              "prompts_too_long": rejects.by_reason.get("too_long", 0),
              "prompts_filtered_by_task": n_filtered,
              "prompts_rejected_by_reason": dict(sorted(rejects.by_reason.items())),
              "unreadable_files": unreadable}
    if unreadable:
        log.warning("grpo: unreadable files in data.path (listed in rejects.parquet and the manifest): %s",
                    [u["file"] for u in unreadable])
    return PromptSet(ids, texts, cols), counts
