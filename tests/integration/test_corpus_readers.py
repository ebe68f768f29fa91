"""Readers + normaliser + prepare on local Ray: every input form gives the same canonical
records, every bad row lands in rejects with its location, and rows_in = ok + rejected."""
import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effsft.corpus.normalize import NormalizeOptions
from effsft.corpus.prepare import AccountingError, CorpusCounts, prepare_corpus, shard_paths

pytestmark = pytest.mark.usefixtures("ray_session")

GOOD = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(30)]


def _canon(out):
    rows = pa.concat_tables([pq.read_table(p) for p in shard_paths(out)]).to_pylist()
    return sorted((r["id"], json.dumps(r["messages"])) for r in rows)


def _write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_input_forms(tmp_path):
    """GOOD in every supported form: (name, path) pairs."""
    from datasets import Dataset, DatasetDict

    src = tmp_path / "src"
    src.mkdir(parents=True)
    _write_jsonl(src / "a.jsonl", GOOD)
    _write_jsonl(src / "a.jsonl.gz", GOOD, gz=True)
    (src / "a.json").write_text(json.dumps(GOOD))
    pq.write_table(pa.Table.from_pylist(GOOD), src / "a.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_jsonl(shards / "part-0.jsonl", GOOD[:10])
    pq.write_table(pa.Table.from_pylist(GOOD[10:]), shards / "part-1.parquet")
    with pa.CompressedOutputStream(str(src / "b.jsonl.zst"), "zstd") as f:
        f.write("".join(json.dumps(r) + "\n" for r in GOOD).encode())
    Dataset.from_list(GOOD).save_to_disk(str(tmp_path / "hf"))
    DatasetDict({"train": Dataset.from_list(GOOD), "test": Dataset.from_list(GOOD[:3])}).save_to_disk(
        str(tmp_path / "hfdict"))
    return [("jsonl", src / "a.jsonl"), ("gz", src / "a.jsonl.gz"), ("json", src / "a.json"),
            ("parquet", src / "a.parquet"), ("zst", src / "b.jsonl.zst"),
            ("dir", shards), ("hf", tmp_path / "hf"), ("hfdict", tmp_path / "hfdict")]


def test_all_input_forms_agree(tmp_path):
    results = {}
    for name, path in write_input_forms(tmp_path):
        counts = prepare_corpus(str(path), tmp_path / f"out-{name}", shard_rows=7)
        assert (counts.rows_in, counts.rows_ok, counts.rows_rejected) == (30, 30, 0), name
        results[name] = _canon(tmp_path / f"out-{name}")
        assert len(shard_paths(tmp_path / f"out-{name}")) == 5  # fixed 7-row shards: 7,7,7,7,2
    first = results.pop("jsonl")
    for name, rows in results.items():
        assert rows == first, name


def test_rejects_have_location_and_reason(tmp_path):
    lines = [json.dumps(GOOD[0]).encode(), b"{broken", b"", json.dumps({"prompt": "p", "response": ""}).encode(),
             b'{"prompt": "\xff\xfe", "response": "r"}', json.dumps({"id": "d", **GOOD[1]}).encode(),
             json.dumps({"id": "d", **GOOD[2]}).encode()]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    counts = prepare_corpus(str(tmp_path / "c.jsonl"), tmp_path / "out")
    assert counts.rows_in == 7 and counts.rows_ok == 2 and counts.rows_rejected == 5
    rej = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert sorted((r["src_row"], r["reason"]) for r in rej) == [
        (1, "parse_error"), (2, "empty_line"), (3, "empty_response"), (4, "invalid_utf8"),
        (6, "duplicate_id")]
    assert all(r["src_file"].endswith("c.jsonl") for r in rej)
    assert next(r for r in rej if r["src_row"] == 1)["raw"] == b"{broken"  # kept raw
    assert counts.rejected_by_reason["duplicate_id"] == counts.duplicate_ids == 1


def test_random_mixtures_keep_the_accounting_identity(tmp_path):
    rng = random.Random(0)
    bad_kinds = [b"nope", b'{"x": 1}', b'{"prompt": "p", "response": "  "}', b"[]",
                 b'{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}']
    for trial in range(3):
        lines, n_bad = [], 0
        for i in range(rng.randint(50, 300)):
            if rng.random() < 0.3:
                lines.append(rng.choice(bad_kinds))
                n_bad += 1
            else:
                lines.append(json.dumps({"prompt": f"t{trial} q{i} {rng.random()}", "response": "a"}).encode())
        (tmp_path / f"m{trial}.jsonl").write_bytes(b"\n".join(lines))
        counts = prepare_corpus(str(tmp_path / f"m{trial}.jsonl"), tmp_path / f"o{trial}", shard_rows=40)
        assert counts.rows_in == len(lines)
        assert counts.rows_rejected == n_bad and counts.rows_ok == len(lines) - n_bad
        rej = pq.read_table(tmp_path / f"o{trial}" / "rejects.parquet")
        assert rej.num_rows == n_bad
        assert sum(pq.read_metadata(p).num_rows for p in shard_paths(tmp_path / f"o{trial}")) == counts.rows_ok


def test_synthetic_corpus_garbage_is_rejected(synth_corpus, tmp_path):
    counts = prepare_corpus(str(synth_corpus / "train"), tmp_path / "out", shard_rows=500)
    meta = [json.loads(m) for p in sorted((synth_corpus / "train").glob("*.parquet"))
            for m in pq.read_table(p, columns=["meta"]).column("meta").to_pylist()]
    assert counts.rows_in == 2000
    assert counts.rows_rejected == sum(bool(m.get("garbage")) for m in meta)


def test_accounting_check_fails_loudly():
    c = CorpusCounts(rows_in=10, rows_ok=5, rows_rejected=4, rejected_by_reason={"x": 4})
    with pytest.raises(AccountingError):
        c.check()


# ---- the same inputs behind s3:// (a loopback S3 server: tests/conftest.py) ----------------------

def test_every_input_form_reads_the_same_from_s3(tmp_path, s3_server):
    from effsft.corpus.readers import resolve_files

    forms = write_input_forms(tmp_path / "local")
    s3_server.upload(tmp_path / "local", "forms")
    for name, path in forms:
        rel = path.relative_to(tmp_path / "local").as_posix()
        uri = f"s3://forms/in/{rel}?{s3_server.query}"
        local_files = resolve_files(path)
        assert resolve_files(uri) == [f"s3://forms/in/{f[len(str(tmp_path / 'local')) + 1:]}"
                                      for f in local_files], name
        counts = prepare_corpus(uri, tmp_path / f"s3-{name}", shard_rows=7)
        want = prepare_corpus(str(path), tmp_path / f"local-{name}", shard_rows=7)
        assert counts.as_dict() == want.as_dict(), name
        assert _canon(tmp_path / f"s3-{name}") == _canon(tmp_path / f"local-{name}"), name


def test_s3_corpus_rejects_fingerprint_config_and_train_source(synth_corpus, tmp_path, s3_server):
    import pyarrow.fs as pafs

    from effsft.config import ConfigError, build_config
    from effsft.corpus.jobs import PrepareConfig, run_prepare
    from effsft.report.manifest import fingerprint
    from effsft.train.data import source_dataset

    uri = s3_server.upload(synth_corpus / "train", "corpus")
    cfg = build_config(PrepareConfig, {"input": {"path": uri, "shard_rows": 500},
                                       "output": str(tmp_path / "prepared")})
    res = run_prepare(cfg)
    want = prepare_corpus(str(synth_corpus / "train"), tmp_path / "local", shard_rows=500)
    assert res["rows_in"] == want.rows_in == 2000 and res["rows_rejected"] == want.rows_rejected > 0
    assert _canon(tmp_path / "prepared") == _canon(tmp_path / "local")
    rej = pq.read_table(tmp_path / "prepared" / "rejects.parquet").to_pylist()
    garbage = [r for r in rej if r["reason"] != "duplicate_id"]
    assert garbage and all(r["src_file"].startswith("s3://corpus/in/") and "?" not in r["src_file"]
                           for r in garbage)
    # Fingerprints: stable, and a rewritten object changes them (size + mtime, not a re-download).
    fp = fingerprint(uri)
    assert fp == fingerprint(uri) != fingerprint(str(synth_corpus / "train"))
    fs, inner = pafs.FileSystem.from_uri(uri)
    extra = f"{inner}/extra.jsonl"
    with fs.open_output_stream(extra) as f:
        f.write(json.dumps(GOOD[0]).encode() + b"\n")
    assert fingerprint(uri) != fp
    fs.delete_file(extra)
    # A key that does not exist fails at config load, naming the key.
    with pytest.raises(ConfigError, match=r"input\.path.*does not exist"):
        build_config(PrepareConfig, {"input": {"path": f"s3://corpus/nope?{s3_server.query}"},
                                     "output": str(tmp_path / "x")})
    # Models stay local: a URI there is refused with the reason.
    from effsft.config import ModelSpec

    with pytest.raises(ConfigError, match="local or mounted path"):
        build_config(ModelSpec, {"path": f"s3://corpus/model?{s3_server.query}"})
    with pytest.raises(ConfigError, match=r"output: .*atomic rename"):
        build_config(PrepareConfig, {"input": {"path": uri}, "output": "s3://corpus/out"})
    # A prepared corpus uploaded to S3 is a training source read as is (its canonical shards).
    ds = source_dataset(s3_server.upload(tmp_path / "prepared", "prepared"), NormalizeOptions.of(cfg.input))
    assert ds.count() == res["rows_ok"] and "reject_reason" not in ds.schema().names
