"""The one record shape that flows through effsft, and the reject reasons.

Canonical record (Arrow)::

    id:       string                                   given id, else BLAKE2b-128 of messages
    messages: list<struct<role: string, content: string>>   roles: system | user | assistant
    source:   string                                   "<file>:<row>" where it was read
    meta:     string                                   JSON object (task labels, extra fields)

Scores are extra columns (``score_<name>``); selection adds nothing but a subset.
"""
from __future__ import annotations

import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

CANONICAL_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("messages", pa.list_(MESSAGE_TYPE)),
    ("source", pa.string()),
    ("meta", pa.string()),
])

# What a reader hands the normaliser: one raw row with where it came from.
RAW_SCHEMA = pa.schema([
    ("raw", pa.binary()),        # the row as read: a JSONL line, or a JSON dump of a table row
    ("src_file", pa.string()),
    ("src_row", pa.int64()),     # 0-based row (line) number within src_file
    # null for a row; for the one marker row of a file that could not be read (whole or from
    # src_row on: truncated, bad footer, corrupt compressed stream) the reader's error
    ("read_error", pa.string()),
])

# Normaliser output: canonical fields (null for rejects) + reject info (null for good rows).
NORMALISED_SCHEMA = pa.schema(list(CANONICAL_SCHEMA) + [
    ("reject_reason", pa.string()),
    ("reject_detail", pa.string()),
    ("raw", pa.binary()),
    ("src_file", pa.string()),
    ("src_row", pa.int64()),
])

REJECTS_SCHEMA = pa.schema([
    ("src_file", pa.string()),
    ("src_row", pa.int64()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("id", pa.string()),
    ("raw", pa.binary()),
])

REJECT_REASONS = {
    "parse_error": "the line/row is not a JSON object",
    "invalid_utf8": "bytes that are not valid UTF-8",
    "too_large": "raw row larger than corpus.max_row_bytes",
    "unknown_format": "none of messages / conversations / instruction+output / prompt+response",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. messages not a list)",
    "non_text_content": "message content that is not text",
    "bad_roles": "unknown role, misplaced system turn, or no user turn before the response",
    "empty_response": "the final assistant turn is missing or empty",
    "empty_line": "a blank line in a JSONL file",
    "unreadable_file": "a file (or its rest from src_row on) that cannot be read: truncated, bad "
                       "footer, corrupt compressed stream; one row per file, detail = the reader's error",
    "duplicate_id": "a later row whose id was already seen (first occurrence kept)",
    # training jobs add the rows their tokenisation cannot use (sft: too_long, no_response;
    # grpo: too_long = prompt over data.max_prompt_tokens)
    "too_long": "the final response does not fit tokenize.max_len",
    "no_response": "no token carries a label",
    # grpo prompts
    "empty_prompt": "the prompt renders to no tokens",
}

ROLES = ("system", "user", "assistant")
