"""How a failed run ends: one line naming the cause, on every rank, within seconds, exit code 2.

A traceback left to the interpreter is not enough: at exit, multiprocessing waits for DataLoader
workers that ignore SIGTERM, so the process would never end and a SLURM job never requeue. The
entry point therefore reports the failure itself, shuts the loader down and leaves with `os._exit`
under a deadline. Errors that are the user's (recipe, shards, model folder, a tampered or full
checkpoint) are one line; anything else is a bug, and its full traceback goes to a file named in
that line.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import NoReturn

EXIT_CODE = 2
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_WRITE_FAILED = ("file write failed", "no space left", "unexpected pos")
_LOW_SPACE_BYTES = 64 * 2**20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the folder and what is still intact."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message alone tells the user what to fix."""
    from dydit_scale.config import RecipeError
    from dydit_scale.data.format import DataFormatError
    from dydit_scale.io import UnreadableFileError
    from dydit_scale.models.loading import ModelFolderError
    from dydit_scale.train.safe_load import UnsafeCheckpointError

    return (RecipeError, DataFormatError, ModelFolderError, UnreadableFileError, UnsafeCheckpointError,
            CheckpointWriteError, FileNotFoundError)


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _mount_of(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def checkpoint_write_error(err: BaseException, folder: Path, previous: Path | None) -> CheckpointWriteError | None:
    """`err` raised while writing checkpoint `folder`, as a one-line error; None if it is no write failure.

    torch.save reports a full disk as `inline_container.cc: file write failed` without an errno, so
    the free space of the device decides between "no space left" and a plain write error.
    """
    if not any(isinstance(e, OSError) or any(w in str(e).lower() for w in _WRITE_FAILED) for e in _chain(err)):
        return None
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    mount, free = _mount_of(existing), shutil.disk_usage(existing).free
    kept = f"{previous} is intact" if previous is not None else "no earlier checkpoint exists"
    no_space = any(getattr(e, "errno", None) in _NO_SPACE for e in _chain(err)) or free < _LOW_SPACE_BYTES
    if no_space:
        return CheckpointWriteError(f"no space left on {mount} ({free / 2**20:.1f} MiB free) while writing "
                                    f"checkpoint {folder}; it was not committed, {kept}")
    first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return CheckpointWriteError(f"writing checkpoint {folder} failed ({first}); it was not committed, {kept}")


def one_line(err: BaseException, *, traceback_dir: Path | None, rank: int) -> str:
    """The failure as one line; a bug's traceback is saved under `traceback_dir` and named."""
    if isinstance(err, user_errors()):
        return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    full = next((e for e in _chain(err) if getattr(e, "errno", None) in _NO_SPACE), None)
    if full is not None:  # outside a checkpoint write: a log line, a sample grid, a validation file
        return f"no space left on device{f' writing {full.filename}' if full.filename else ''} ({full.strerror})"
    folder = traceback_dir if traceback_dir is not None and traceback_dir.is_dir() else Path(tempfile.gettempdir())
    where = folder / f"failure-rank{rank}.txt"
    try:
        where.write_text("".join(traceback.format_exception(err)))
        saved = f" (traceback in {where})"
    except OSError:
        saved = ""
    summary = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {summary}{saved}" if summary else f"{type(err).__name__}{saved}"


def exit_now(code: int = EXIT_CODE) -> NoReturn:
    """Flush and leave without the interpreter's exit handlers (they wait on stuck children)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not keep the process alive
            pass
    os._exit(code)


def exit_within(seconds: float, code: int, message: str) -> None:
    """Guarantee the process ends within `seconds` with `message`, whatever the cleanup does."""
    def expire() -> None:
        print(f"{message} (cleanup did not finish in {seconds:.0f} s)", file=sys.stderr)
        exit_now(code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
