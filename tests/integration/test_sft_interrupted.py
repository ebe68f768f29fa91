"""SIGTERM to an ``effsft sft`` driver (``ray job stop`` sends it): the workers stop, the
checkpoints in ``<out>.partial/`` stay, the process exits 143, and the same command resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_keeps_partial_and_rerun_resumes(synth_corpus, tiny_model_dir, tmp_path):
    shard = sorted((synth_corpus / "train").glob("*.parquet"))[0]
    rows = [r for r in pq.read_table(shard).to_pylist() if not json.loads(r["meta"]).get("garbage")][:8]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n" for r in rows))
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "effsft", "sft", "--model", str(tiny_model_dir), "--data", str(data),
           "--output", str(out), "tokenize.max_len=96", "train.num_workers=1", "train.micro_batch_size=2",
           "train.max_steps=40", "train.checkpoint_every=2", "train.lr=1e-3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sft.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(3)  # Ray Train registers the step-4 checkpoint at its next poll
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 143 and "interrupted (SIGTERM)" in err, err[-3000:]
    assert (tmp_path / "sft.partial" / "checkpoints").is_dir() and not out.exists()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["steps"] == 40 and m["resumed_from_step"] >= 2
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert steps == list(range(1, 41))
