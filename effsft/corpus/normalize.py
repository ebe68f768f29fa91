"""Format detection and normalisation of one raw row into the canonical record.

Pure Python (no Ray): ``normalize_row`` maps a raw JSON row to ``(record, None)`` or
``(None, (reason, detail))``; ``normalize_table`` applies it to an Arrow batch of raw rows.

Formats, auto-detected per row (first match wins):
  * OpenAI      ``{"messages": [{"role", "content"}, ...]}``
  * ShareGPT    ``{"conversations": [{"from", "value"}, ...]}``
  * Alpaca      ``{"instruction", "input"?, "output", "system"?}``
  * prompt/response ``{"prompt", "response", "system"?}``
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from effsft.corpus.schema import NORMALISED_SCHEMA

# ShareGPT speaker names seen in the wild -> canonical role.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
                "developer": "system"}


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class NormalizeOptions:
    """Reader options that change the result (they go into the input fingerprint)."""

    max_row_bytes: int = 1 << 20
    id_field: str = "id"
    require_user_turn: bool = True
    on_unreadable: str = "reject"   # a file that cannot be read: "reject" (a row in rejects) or "fail"

    @classmethod
    def of(cls, spec) -> "NormalizeOptions":
        """The options of an input spec (config's ``InputSpec``: max_row_bytes, id_field, on_unreadable)."""
        return cls(max_row_bytes=spec.max_row_bytes, id_field=spec.id_field, on_unreadable=spec.on_unreadable)


def content_id(messages: list[dict]) -> str:
    """BLAKE2b-128 of the canonical messages: stable across runs, machines and formats."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=16).hexdigest()


def _text(value: Any, where: str) -> str:
    if value is None:
        raise Reject("missing_field", f"{where} is null")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # OpenAI content parts: only text parts are accepted.
        parts = []
        for p in value:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise Reject("non_text_content", f"{where} has a non-text part")
        return "".join(parts)
    if isinstance(value, (dict, bytes)):
        raise Reject("non_text_content", f"{where} is a {type(value).__name__}")
    raise Reject("wrong_type", f"{where} is a {type(value).__name__}, not a string")


def _turns(items: Any, field: str, role_key: str, text_key: str, role_map: dict) -> list[dict]:
    if not isinstance(items, list):
        raise Reject("wrong_type", f"{field} is a {type(items).__name__}, not a list")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise Reject("wrong_type", f"{field}[{i}] is not an object")
        if role_key not in m or m[role_key] is None:
            raise Reject("missing_field", f"{field}[{i}].{role_key}")
        if not isinstance(m[role_key], str):
            raise Reject("wrong_type", f"{field}[{i}].{role_key} is not a string")
        role = role_map.get(m[role_key].strip().lower())
        if role is None:
            raise Reject("bad_roles", f"unknown role {m[role_key]!r} at {field}[{i}]")
        if text_key not in m:
            raise Reject("missing_field", f"{field}[{i}].{text_key}")
        out.append({"role": role, "content": _text(m[text_key], f"{field}[{i}].{text_key}")})
    return out


def _pair(row: dict, q_key: str, a_key: str, extra_q: str | None = None) -> list[dict]:
    q = _text(row.get(q_key), q_key)
    if extra_q and row.get(extra_q) not in (None, ""):
        q = q + "\n\n" + _text(row[extra_q], extra_q)
    if a_key not in row:
        raise Reject("missing_field", a_key)
    a = _text(row[a_key], a_key)
    msgs = []
    if row.get("system") not in (None, ""):
        msgs.append({"role": "system", "content": _text(row["system"], "system")})
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "response" in row:
        return "prompt_response"
    raise Reject("unknown_format", "keys: " + ",".join(sorted(map(str, row))[:12]))


_FORMAT_FIELDS = {"messages": {"messages"}, "sharegpt": {"conversations"},
                  "alpaca": {"instruction", "input", "output", "system"},
                  "prompt_response": {"prompt", "response", "system"}}


def to_messages(row: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        return _turns(row["messages"], "messages", "role", "content", OPENAI_ROLES)
    if fmt == "sharegpt":
        return _turns(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        return _pair(row, "instruction", "output", extra_q="input")
    return _pair(row, "prompt", "response")


def check_messages(msgs: list[dict], opts: NormalizeOptions) -> None:
    if not msgs:
        raise Reject("missing_field", "no turns")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise Reject("bad_roles", f"system turn at position {i}")
    if msgs[-1]["role"] != "assistant":
        raise Reject("empty_response", "the conversation does not end with an assistant turn")
    if not msgs[-1]["content"].strip():
        raise Reject("empty_response", "the final assistant turn is empty")
    if opts.require_user_turn and not any(m["role"] == "user" for m in msgs[:-1]):
        raise Reject("bad_roles", "no user turn before the response")


def _meta(row: dict, fmt: str, opts: NormalizeOptions) -> str:
    meta: dict = {}
    given = row.get("meta")
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except json.JSONDecodeError:
            given = {"meta": given}
    if isinstance(given, dict):
        meta.update(given)
    for k, v in row.items():
        if k not in _FORMAT_FIELDS[fmt] and k not in ("meta", opts.id_field):
            meta.setdefault(k, v)
    meta["format"] = fmt
    return json.dumps(meta, ensure_ascii=False, default=str, sort_keys=True)


def parse_object(raw: bytes, max_row_bytes: int) -> dict:
    """Raw row bytes -> the JSON object. Raises ``Reject`` (too_large, invalid_utf8,
    empty_line, parse_error)."""
    if len(raw) > max_row_bytes:
        raise Reject("too_large", f"{len(raw)} bytes > max_row_bytes={max_row_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("invalid_utf8", str(e)[:200]) from None
    if not text.strip():
        raise Reject("empty_line", "")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise Reject("parse_error", str(e)[:200]) from None
    if not isinstance(row, dict):
        raise Reject("parse_error", f"a JSON {type(row).__name__}, not an object")
    return row


def normalize_row(raw: bytes, opts: NormalizeOptions = NormalizeOptions()) -> dict:
    """Raw JSON bytes -> canonical dict (without ``source``). Raises ``Reject``."""
    row = parse_object(raw, opts.max_row_bytes)
    fmt = detect_format(row)
    msgs = to_messages(row, fmt)
    check_messages(msgs, opts)
    given = row.get(opts.id_field)
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given).strip():
        rid = str(given)
    else:
        rid = content_id(msgs)
    return {"id": rid, "messages": msgs, "meta": _meta(row, fmt, opts)}


def normalize_table(batch: pa.Table, opts: NormalizeOptions = NormalizeOptions()) -> pa.Table:
    """A batch of RAW_SCHEMA rows -> NORMALISED_SCHEMA rows, one out per one in."""
    raws = batch.column("raw").to_pylist()
    files = batch.column("src_file").to_pylist()
    rows = batch.column("src_row").to_pylist()
    errors = (batch.column("read_error").to_pylist() if "read_error" in batch.column_names
              else [None] * batch.num_rows)
    cols: dict[str, list] = {f.name: [] for f in NORMALISED_SCHEMA}
    for raw, f, r, read_error in zip(raws, files, rows, errors):
        try:
            if read_error is not None:  # the reader's marker of a file it could not read
                raise Reject("unreadable_file", f"{f}: {read_error}")
            rec = normalize_row(raw, opts)
            cols["id"].append(rec["id"])
            cols["messages"].append(rec["messages"])
            cols["meta"].append(rec["meta"])
            cols["reject_reason"].append(None)
            cols["reject_detail"].append(None)
            cols["raw"].append(None)
        except Reject as e:
            for k in ("id", "messages", "meta"):
                cols[k].append(None)
            cols["reject_reason"].append(e.reason)
            cols["reject_detail"].append(e.detail)
            cols["raw"].append(raw)
        except Exception as e:  # never lose a row to an unexpected error
            for k in ("id", "messages", "meta"):
                cols[k].append(None)
            cols["reject_reason"].append("parse_error")
            cols["reject_detail"].append(f"{type(e).__name__}: {e}"[:200])
            cols["raw"].append(raw)
        cols["source"].append(f"{f}:{r}")
        cols["src_file"].append(f)
        cols["src_row"].append(r)
    return pa.Table.from_pydict(cols, schema=NORMALISED_SCHEMA)
