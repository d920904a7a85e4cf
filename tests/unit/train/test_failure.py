"""How a failure is put into one line: user errors as they are, a full disk by name, a bug with its
traceback saved to a file."""

from __future__ import annotations

import errno
from pathlib import Path

from dydit_scale.data.format import DataFormatError
from dydit_scale.train import failure

TORCH_FULL_DISK = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                   "file write failed")


def test_a_user_error_is_its_own_message_on_one_line():
    assert failure.one_line(DataFormatError("data.shards: no readable sample"), traceback_dir=None, rank=0) \
        == "data.shards: no readable sample"


def test_a_bug_is_one_line_and_its_traceback_is_saved(tmp_path):
    try:
        raise KeyError("unexpected\nsecond line")
    except KeyError as err:
        line = failure.one_line(err, traceback_dir=tmp_path, rank=3)
    saved = tmp_path / "failure-rank3.txt"
    assert line == f"KeyError: 'unexpected\\nsecond line' (traceback in {saved})"
    assert "Traceback" in saved.read_text() and "test_failure.py" in saved.read_text()


def test_enospc_anywhere_is_no_space_left():
    err = OSError(errno.ENOSPC, "No space left on device", "/run/metrics.jsonl")
    assert failure.one_line(err, traceback_dir=None, rank=0).startswith("no space left on device writing /run/metrics.jsonl")
    wrapped = failure.checkpoint_write_error(RuntimeError("save failed"), Path("/tmp/step-0000002.partial"), None)
    assert wrapped is None  # no errno, no write-failure words: not a write failure
    try:
        try:
            raise err
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        full = failure.checkpoint_write_error(outer, Path("/tmp/step-0000002.partial"), Path("/tmp/step-0000001"))
    assert "no space left on /" in str(full) and "/tmp/step-0000001 is intact" in str(full)


def test_torchs_write_failure_on_a_disk_with_room_is_a_plain_write_error(tmp_path):
    err = failure.checkpoint_write_error(RuntimeError(TORCH_FULL_DISK), tmp_path / "step-0000002.partial", None)
    assert str(err).startswith(f"writing checkpoint {tmp_path / 'step-0000002.partial'} failed (")
    assert str(err).endswith("it was not committed, no earlier checkpoint exists")
    assert "\n" not in str(err)
