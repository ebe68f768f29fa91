"""Operations of ``effsft select`` as real processes (``python -m effsft select``, each with its
own embedded Ray): two runs started at the same moment on one output, and a run stopped by
SIGTERM at a known point (after 2 shards are scored) that a re-run resumes to the selection
of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("EFFSFT_RAY_NUM_CPUS", "4")
    env.setdefault("EFFSFT_RAY_OBJECT_STORE", str(512 << 20))
    return env


def _select(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "effsft", "select", *map(str, args)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def test_two_selects_on_one_output_one_writer(synth_corpus, tmp_path):
    out = tmp_path / "sel"
    common = ["--input", synth_corpus / "train", "--method", "random", "--budget", 100, "--seed", 3,
              "--output", out, f"cache_dir={tmp_path / 'cache'}", "plots=false"]
    a, b = _select(*common, "--wait"), _select(*common)  # the same moment; one waits, one does not
    (rc_a, err_a), (rc_b, err_b) = _finish(a), _finish(b)
    assert sorted([rc_a, rc_b]) == [0, 2], (err_a[-2000:], err_b[-2000:])
    loser = err_a if rc_a == 2 else err_b
    assert "already complete" in loser or ("being written by" in loser and "pid " in loser), loser[-2000:]
    assert (out / "_SUCCESS").exists() and pq.read_metadata(out / "selected.parquet").num_rows == 100
    assert not (tmp_path / "sel.partial").exists() and not (tmp_path / "sel.lock").exists()


def test_sigterm_mid_scoring_then_rerun_equals_uninterrupted(synth_corpus, tiny_model_dir, tmp_path, ray_session):
    def args(out, cache, *extra):
        return ["--input", synth_corpus / "train", "--method", "length", "--budget", 200, "--model", tiny_model_dir,
                "--output", out, f"cache_dir={cache}", "input.shard_rows=300", "scorer.batch_size=100",
                "plots=false", *extra]

    out, cache = tmp_path / "sel", tmp_path / "cache"
    cmd = args(out, cache, "fault.hold_after_shards=2")
    p = _select(*cmd)
    holding = tmp_path / "sel.partial" / ".faults" / "holding"
    deadline = time.monotonic() + 240
    while not holding.exists():  # the driver has written 2 score shards and waits there
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    done = list(cache.glob("scores/length-*/shard-*.done.json"))
    assert len(done) == 2
    p.send_signal(signal.SIGTERM)
    rc, err = _finish(p, 120)
    assert rc == 143 and "interrupted (SIGTERM)" in err and "resume" in err, err[-3000:]
    assert (tmp_path / "sel.partial").is_dir() and not out.exists() and not (tmp_path / "sel.lock").exists()

    rc, err = _finish(_select(*cmd))  # the same command again: resumes (the hold fires once)
    assert rc == 0, err[-3000:]
    import json

    scoring = json.loads((out / "manifest.json").read_text())["scoring"]
    assert [v["shards_reused"] for v in scoring.values()] == [2]

    ref = tmp_path / "ref"  # uninterrupted, scored from scratch (its own cache), on the session's Ray
    from effsft.cli import main

    assert main(["select", *map(str, args(ref, tmp_path / "cache2"))]) == 0
    got = pq.read_table(out / "selected.parquet", columns=["id", "score"]).to_pylist()
    want = pq.read_table(ref / "selected.parquet", columns=["id", "score"]).to_pylist()
    assert got == want and len(got) == 200
