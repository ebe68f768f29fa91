"""The console's log files belong to one job: after it, nothing points at its (renamed) dir."""
import logging

from effsft import console


def test_a_finished_job_leaves_no_log_dir_behind(tmp_path):
    """CI once failed 60 tests: a job run in-process logged to ``<out>.partial/logs``, the commit
    renamed the dir, and the next ``ray.init`` of the process tried to open workers.log there."""
    pytest = __import__("pytest")
    pytest.importorskip("ray")
    console.setup("info")
    work = tmp_path / "job.partial"
    console.log_to(work / "logs")
    logging.getLogger("effsft.test").info("during the job")
    console._route_worker_output()  # a Ray started during the job: workers.log opened
    assert (work / "logs" / console.WORKERS_FILE).exists()
    work.rename(tmp_path / "job")  # the commit
    console.detach()
    assert console.S.log_dir is None and console.S.file is None
    console._route_worker_output()  # a later ray.init in the same process must not fail
    logging.getLogger("effsft.test").info("after the job")
    text = (tmp_path / "job" / "logs" / console.LOG_FILE).read_text()
    assert "during the job" in text and "after the job" not in text
    assert not work.exists()


def test_worker_sink_creates_its_directory(tmp_path):
    sink = console._WorkerSink()
    sink({"pid": 1, "lines": ["early line"]})
    sink.open(tmp_path / "new" / "logs" / console.WORKERS_FILE)
    sink({"pid": 1, "lines": ["late line"]})
    sink.close_file()
    text = (tmp_path / "new" / "logs" / console.WORKERS_FILE).read_text()
    assert "early line" in text and "late line" in text
