"""A select over three Parquet shards, one truncated to half its bytes (an interrupted copy):
the run succeeds with the file in rejects.parquet and the manifest, or, with
``input.on_unreadable=fail``, exits 1 naming the file and leaves no ``_SUCCESS``."""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from effsft.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def damaged_shards(synth_corpus, tmp_path):
    src = sorted((synth_corpus / "train").glob("*.parquet"))
    assert len(src) == 3
    d = tmp_path / "in"
    d.mkdir()
    for p in src:
        shutil.copy(p, d / p.name)
    bad = d / src[1].name
    b = bad.read_bytes()
    bad.write_bytes(b[: len(b) // 2])
    rows = {p.name: pq.read_metadata(p).num_rows for p in src}
    return d, bad, rows


def test_select_rejects_the_truncated_shard_and_goes_on(damaged_shards, tmp_path, capsys):
    d, bad, rows = damaged_shards
    out = tmp_path / "sel"
    rc = main(["select", "--input", str(d), "--method", "random", "--budget", "100", "--output", str(out),
               f"cache_dir={tmp_path / 'cache'}", "plots=false"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    readable = sum(n for name, n in rows.items() if name != bad.name)
    assert c["rows_in"] == readable + 1  # every readable row, plus the one entry for the file
    assert c["rejected_by_reason"]["unreadable_file"] == 1
    assert [u["file"] for u in c["unreadable_files"]] == [str(bad)]
    assert c["unreadable_files"][0]["rows_read"] == 0 and "magic bytes" in c["unreadable_files"][0]["error"]
    rej = [r for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["reason"] == "unreadable_file"]
    assert len(rej) == 1 and rej[0]["src_file"] == str(bad) and str(bad) in rej[0]["detail"]
    assert c["rows_in"] == c["rows_selected"] + c["rows_not_selected"] + c["rows_rejected"]
    assert (out / "_SUCCESS").exists()


def test_select_on_unreadable_fail_exits_1_naming_the_file(damaged_shards, tmp_path, capsys):
    d, bad, _ = damaged_shards
    out = tmp_path / "sel"
    rc = main(["select", "--input", str(d), "--method", "random", "--budget", "100", "--output", str(out),
               f"cache_dir={tmp_path / 'cache'}", "input.on_unreadable=fail"])
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "on_unreadable=fail" in err
    assert not (out / "_SUCCESS").exists() and not out.exists()
