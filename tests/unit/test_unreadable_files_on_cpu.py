"""Damaged corpus files (no Ray): the readers keep what can be read and end a damaged file with
one marker row, which the normaliser turns into an ``unreadable_file`` reject naming the file and
the reader's error; ``on_unreadable="fail"`` raises naming the file; a torn last JSONL line is a
``parse_error``."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effsft.corpus.normalize import NormalizeOptions, normalize_table
from effsft.corpus.readers import UnreadableFileError, iter_raw_file

ROWS = [{"id": str(i), "prompt": f"question {i} " * 5, "response": f"answer {i} " * 5} for i in range(3000)]
DATA = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)


def _halve(path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])
    return path


def _normalised(path, on_unreadable="reject") -> pa.Table:
    raw = pa.concat_tables(list(iter_raw_file(str(path), on_unreadable)))
    return normalize_table(raw, NormalizeOptions())


def _write_zst(path):
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(DATA)
    return path


def _write_parquet(path):
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=500)
    return path


@pytest.mark.parametrize("make", ["parquet", "gzip", "zstd"])
def test_truncated_file_keeps_rows_before_the_damage_and_one_reject(tmp_path, make):
    path = {"parquet": lambda: _write_parquet(tmp_path / "c.parquet"),
            "gzip": lambda: (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(DATA)) and tmp_path / "c.jsonl.gz",
            "zstd": lambda: _write_zst(tmp_path / "c.jsonl.zst")}[make]()
    _halve(path)
    t = _normalised(path)
    reasons = t["reject_reason"].to_pylist()
    assert reasons.count("unreadable_file") == 1 and reasons[-1] == "unreadable_file"
    ok = [r for r in reasons if r is None]
    assert len(ok) == t.num_rows - 1 < len(ROWS)  # what could be read is kept, nothing invented
    last = t.slice(t.num_rows - 1).to_pylist()[0]
    assert last["src_file"] == str(path) and last["src_row"] == len(ok)
    assert str(path) in last["reject_detail"] and ("Truncated" in last["reject_detail"]
                                                   or "magic bytes" in last["reject_detail"])
    assert t["id"].to_pylist()[: len(ok)] == [str(i) for i in range(len(ok))]


def test_bad_parquet_footer_is_one_reject(tmp_path):
    path = _write_parquet(tmp_path / "c.parquet")
    b = bytearray(path.read_bytes())
    b[-8:-4] = b"\xff\xff\xff\x7f"  # footer length pointing nowhere
    path.write_bytes(bytes(b))
    t = _normalised(path)
    assert t["reject_reason"].to_pylist() == ["unreadable_file"] and t["src_row"].to_pylist() == [0]


def test_on_unreadable_fail_names_the_file(tmp_path):
    path = _halve(_write_parquet(tmp_path / "c.parquet"))
    with pytest.raises(UnreadableFileError, match=rf"{path}.*on_unreadable=fail"):
        _normalised(path, "fail")


def test_torn_last_jsonl_line_is_a_parse_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(DATA[:-25])  # the copy stopped inside the last line
    t = _normalised(path)
    reasons = t["reject_reason"].to_pylist()
    assert t.num_rows == len(ROWS) and reasons[-1] == "parse_error" and reasons.count(None) == len(ROWS) - 1


def test_intact_files_have_no_marker(tmp_path):
    t = _normalised(_write_parquet(tmp_path / "c.parquet"))
    assert t.num_rows == len(ROWS) and set(t["reject_reason"].to_pylist()) == {None}
