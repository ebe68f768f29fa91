"""The one console line a failed job prints names the cause, also when Ray wrapped it."""
import errno

from ray.exceptions import RayTaskError

from effsft.cli import failure_message
from effsft.corpus.readers import UnreadableFileError

MSG = "unreadable corpus file /data/shard-00001.parquet (after 0 rows): bad footer (input.on_unreadable=fail)"


def _raised(exc):
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001
        return e


def test_unreadable_file_named_through_rays_task_error_wrapper():
    cause = _raised(UnreadableFileError(MSG))
    dual = RayTaskError("ReadCorpus", "Traceback (most recent call last):\n  ...\nUnreadableFileError: x",
                        cause).as_instanceof_cause()
    assert isinstance(dual, UnreadableFileError) and not str(dual).startswith("unreadable")
    assert failure_message(dual) == MSG
    try:
        raise RuntimeError("the executor gave up") from dual
    except RuntimeError as outer:
        assert failure_message(outer) == MSG


def test_plain_errors_give_the_innermost_one_line():
    assert failure_message(_raised(UnreadableFileError(MSG))) == MSG
    disk = OSError(errno.ENOSPC, "No space left on device", "/out/part-0.parquet")
    assert failure_message(disk) == "disk full while writing /out/part-0.parquet: No space left on device"
    try:
        try:
            raise KeyError("k")
        except KeyError as k:
            raise ValueError("first line\nlast line") from k
    except ValueError as v:
        assert failure_message(v) == "KeyError: 'k'"
