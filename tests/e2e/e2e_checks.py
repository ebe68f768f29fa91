"""Output checks shared by the e2e modules (imported by path: tests have no packages)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq


def check_select_output(out: Path, budget: int, rows: int) -> dict:
    """Accounting, selection and the score table: every usable row scored exactly once."""
    m = json.loads((out / "manifest.json").read_text())
    assert (out / "_SUCCESS").exists() and not Path(f"{out}.partial").exists()
    c = m["counts"]
    assert c["rows_in"] == rows == c["rows_selected"] + c["rows_not_selected"] + c["rows_rejected"]
    n_ok = c["rows_selected"] + c["rows_not_selected"]
    sel = pq.read_table(out / "selected.parquet", columns=["id"]).column("id").to_pylist()
    assert len(sel) == len(set(sel)) == budget == c["rows_selected"]
    scores = pq.read_table(out / "scores.parquet")
    ids = scores.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n_ok
    assert set(sel) <= set(ids) and sum(scores.column("selected").to_pylist()) == budget
    assert m["ray"]["mode"] == "cluster"
    assert m["scoring"]
    for key, st in m["scoring"].items():   # each scorer: every shard, every usable row, once
        assert st["shards_reused"] + st["shards_scored"] == st["shards_total"], (key, st)
        if st["shards_reused"] == 0:
            assert st["rows_scored"] == n_ok, (key, st)
    return m


def n_ok(manifest: dict) -> int:
    return manifest["counts"]["rows_selected"] + manifest["counts"]["rows_not_selected"]


def check_store(cache: Path, rows_ok: int) -> None:
    """The score store: per scorer, every shard file has a done marker and all rows once."""
    stores = [d for d in (cache / "scores").iterdir() if d.is_dir()]
    assert stores
    for d in stores:
        ids = []
        for f in sorted(d.glob("shard-*.parquet")):
            assert f.with_name(f.stem + ".done.json").exists(), f
            ids += pq.read_table(f, columns=["id"]).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == rows_ok, d.name


def metric_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip()]


def poll(what: str, fn, timeout: float, every: float = 0.25):
    """fn() until truthy (returned), or fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def build_corpus_and_model(built: Path, rows: int, eval_rows: int = 8) -> None:
    """A synthetic corpus (2% garbage rows) and a tiny model under ``built`` (no Ray needed)."""
    from effsft.cli import main as effsft_main

    root = Path(__file__).resolve().parents[2]
    corpus, model = built / "corpus", built / "model"
    assert effsft_main(["synth", str(root / "jobs/synth.yaml"), f"output={corpus}", f"rows={rows}",
                        f"eval_rows={eval_rows}", "grpo_rows=8", "garbage=0.02"]) == 0
    assert effsft_main(["tiny-model", str(root / "jobs/tiny_model.yaml"), f"output={model}",
                        f"corpus={corpus}", "vocab_size=300", "max_position=256"]) == 0


FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_status(info) -> str:
    """A Jobs API JobInfo's status as a plain string."""
    return getattr(info.status, "value", str(info.status))


def job_running(cluster, sid: str) -> None:
    """Fail at once (with the driver's log) if the job ended while a test waits on it."""
    info = cluster.client.get_job_info(sid)
    if job_status(info) in FINAL:
        raise AssertionError(f"job ended early: {info.status}\n"
                             f"{cluster.client.get_job_logs(sid)[-4000:]}")
