"""The sub-steps of `dydit-bench gpu-check`: each one a subprocess with its own log and hard timeout.

A sub-step that fails or runs out of time becomes failed rows of the table and the next one still
runs; it is stopped with its whole process group, so no DeepSpeed rank is left holding the GPU.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Outcome", "Row", "Step", "run_steps", "single_row"]

Status = Literal["passed", "failed", "skipped"]
_MIN_START_S = 20.0
"""A step is not started with less of the budget left than this (or than its own timeout)."""


@dataclass
class Row:
    """One line of the table: a check, how it ended, its numbers and their one-line summary."""

    check: str
    status: Status
    seconds: float | None
    values: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


@dataclass
class Outcome:
    """How a sub-step's process ended."""

    returncode: int | None
    timed_out: bool
    seconds: float
    log: Path

    def failure(self) -> str | None:
        """One line saying why the step failed (None if it exited 0)."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s; log {self.log}"
        if self.returncode != 0:
            return f"exit {self.returncode}: {last_line(self.log)}; log {self.log}"
        return None


@dataclass
class Step:
    """A command and how to read what it wrote into rows (`checks` names them, for skipped rows)."""

    checks: list[str]
    command: list[str]
    timeout_s: float
    rows: Callable[[Outcome], list[Row]]
    stdout: Path | None = None
    """Where the command's stdout goes (e.g. its --json output); None: into the log with stderr."""
    needs: tuple[str, ...] = ()
    """Checks that must have passed before this step can run."""
    skip: str | None = None


def single_row(check: str, parse: Callable[[], tuple[dict[str, Any], str]]) -> Callable[[Outcome], list[Row]]:
    """The rows of a one-check step: failed with the reason, or passed with what `parse` read."""

    def rows(outcome: Outcome) -> list[Row]:
        failure = outcome.failure()
        if failure is None:
            try:
                values, summary = parse()
            except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
                failure = f"unreadable output: {type(err).__name__}: {err}"
            else:
                return [Row(check, "passed", outcome.seconds, values, summary)]
        return [Row(check, "failed", outcome.seconds, {}, failure)]

    return rows


def last_line(log: Path) -> str:
    """The log's last non-empty line, shortened: usually the error."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return (lines[-1] if lines else "no output")[:200]


def run_steps(steps: list[Step], logs: Path, env: dict[str, str], cwd: Path, budget_s: float,
              progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> list[Row]:
    """Run the steps in order within `budget_s` seconds; every step adds its rows, run or not."""
    deadline = time.monotonic() + budget_s
    rows: list[Row] = []
    for index, step in enumerate(steps, start=1):
        passed = {row.check for row in rows if row.status == "passed"}
        missing = [check for check in step.needs if check not in passed]
        left = deadline - time.monotonic()
        reason = step.skip or (f"needs {', '.join(missing)}" if missing else None)
        if reason is None and left < min(_MIN_START_S, step.timeout_s):
            reason = f"not started: the budget of {budget_s:.0f} s is spent"
        if reason is not None:
            new = [Row(check, "skipped", None, {}, reason) for check in step.checks]
        else:
            log = logs / f"{index:02d}-{step.checks[0].replace(' ', '_').replace(':', '')}.log"
            outcome = run_process(step.command, log, env, cwd, min(step.timeout_s, left), step.stdout)
            new = step.rows(outcome)
        rows += new
        for row in new:
            took = "" if row.seconds is None else f" ({row.seconds:.1f} s)"
            progress(f"[{index}/{len(steps)}] {row.check}: {row.status}{took} {row.summary}")
    return rows


def run_process(command: list[str], log: Path, env: dict[str, str], cwd: Path, timeout_s: float,
                stdout: Path | None = None) -> Outcome:
    """Run `command` in its own process group, output into `log` (stdout into `stdout` if given)."""
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out:
        err.write(f"$ {shlex.join(command)}\n")
        err.flush()
        process = subprocess.Popen(command, stdout=out if stdout else err, stderr=err, env=env, cwd=cwd,
                                   start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(process)
        except BaseException:
            stop_group(process)
            raise
    return Outcome(process.returncode, timed_out, time.monotonic() - started, log)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (a chance to clean up), SIGKILL to whatever is left of it."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
