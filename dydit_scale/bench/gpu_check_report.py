"""Reading what the sub-steps of `dydit-bench gpu-check` wrote, and the one table (or JSON) of them.

Parity: pytest's JUnit XML says which cases passed, failed or were skipped (per attention backend, from
the test ids); the tests' JSONL log holds the measured differences. Inference: `dydit-bench infer
--json`. Training: the run's metrics.jsonl.
"""

from __future__ import annotations

import importlib.metadata
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from dydit_scale.bench.gpu_check_steps import Outcome, Row

__all__ = ["environment", "infer_values", "parity_rows", "render_table", "summary_json", "train_values"]


def _backend_of(test_name: str) -> str | None:
    """'sdpa' of 'test_x[sdpa-flux]' (ids join the parameters with '-')."""
    if "[" not in test_name:
        return None
    words = test_name[test_name.index("[") + 1:].rstrip("]").split("-")
    return next((word for word in words if word in ("sdpa", "xformers")), None)


def _junit_cases(path: Path) -> list[tuple[str, str, str]]:
    """(test name, passed|failed|skipped, first line of the message) of every test case."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or child.text or child.tag).strip().splitlines()[0]
                break
        cases.append((case.get("name", ""), status, message))
    return cases


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parity_rows(outcome: Outcome, junit: Path, log: Path,
                backends: tuple[str, ...] = ("sdpa", "xformers")) -> list[Row]:
    """One row per attention backend: failed if any case failed, skipped if every case was skipped;
    the numbers are the largest |fast - masked| per dtype over that backend's cases."""
    checks = [f"parity {backend}" for backend in backends]
    if outcome.timed_out or not junit.is_file():
        failure = outcome.failure() or f"no test report; log {outcome.log}"
        return [Row(check, "failed", outcome.seconds, {}, failure) for check in checks]
    cases, measured = _junit_cases(junit), _read_jsonl(log)
    rows = []
    for check, backend in zip(checks, backends):
        mine = [case for case in cases if _backend_of(case[0]) == backend]
        counts = {status: sum(case[1] == status for case in mine) for status in ("passed", "failed", "skipped")}
        values: dict[str, Any] = {"cases": counts}
        for record in (r for r in measured if r.get("backend") == backend):
            key = f"max_abs_diff_{record['dtype']}"
            values[key] = max(values.get(key, 0.0), float(record["max_abs_diff"]))
        numbers = ", ".join(f"{key.removeprefix('max_abs_diff_')} max|fast-masked| {value:.2e}"
                            for key, value in values.items() if key.startswith("max_abs_diff_"))
        tally = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
        if counts["failed"]:
            first = next(case for case in mine if case[1] == "failed")
            rows.append(Row(check, "failed", outcome.seconds, values, f"{tally}; {first[0]}: {first[2]}"))
        elif counts["passed"]:
            rows.append(Row(check, "passed", outcome.seconds, values, "; ".join(filter(None, (numbers, tally)))))
        else:
            reason = mine[0][2] if mine else (outcome.failure() or "no test cases")
            rows.append(Row(check, "skipped", outcome.seconds, values, reason))
    return rows


def infer_values(path: Path) -> tuple[dict[str, Any], str]:
    """The fast path's numbers from `dydit-bench infer --json` output."""
    result = json.loads(path.read_text())
    rows = {row["path"]: row for row in result["rows"]}
    fast = rows["fast"]
    values = {key: fast[key] for key in ("s_per_step", "flops_ratio", "speedup", "efficiency")}
    values |= {"static_s_per_step": rows["static"]["s_per_step"], "goal_checks": result["goal_checks"],
               "max_abs_diff_fast_vs_masked": result.get("max_abs_diff_fast_vs_masked")}
    goals = "; ".join(f"{name} {goal['goal']} {'met' if goal['met'] else 'MISSED'}"
                      for name, goal in result["goal_checks"].items())
    summary = (f"fast: speed-up {fast['speedup']:.2f}, efficiency {fast['efficiency']:.2f}, FLOPs ratio "
               f"{fast['flops_ratio']:.3f}, {1e3 * fast['s_per_step']:.2f} ms/step "
               f"(static {1e3 * rows['static']['s_per_step']:.2f}); {goals}")
    return values, summary


def train_values(metrics: Path) -> tuple[dict[str, Any], str]:
    """Loss, step seconds and peak memory from the last line of a run's metrics.jsonl (no `max_cuda_gb`
    on CPU)."""
    lines = _read_jsonl(metrics)
    if not lines:
        raise ValueError(f"{metrics}: no metrics line")
    last = lines[-1]
    values = {key: last[key] for key in ("loss", "flops_ratio", "step_s", "samples_per_s", "max_rss_gb")}
    values["max_cuda_gb"] = last.get("max_cuda_gb")

    def gb(key: str) -> str:
        return "n/a" if values[key] is None else f"{values[key]:.1f} GB"

    summary = (f"loss {values['loss']:.4f}, step {values['step_s']:.2f} s, peak CUDA {gb('max_cuda_gb')}, "
               f"peak RSS {gb('max_rss_gb')}")
    return values, summary


def environment(device: str) -> dict[str, str]:
    """Device name and the versions that decide which kernels ran."""
    import torch

    try:
        xformers = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        xformers = "not installed"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda or "none", "xformers": xformers}


def summary_json(rows: list[Row], env: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {**env, **extra, "passed": not any(row.status == "failed" for row in rows),
            "rows": [vars(row) for row in rows]}


def render_table(summary: dict[str, Any]) -> str:
    """The table: one line per check (check, status, seconds, numbers), under a header naming the
    device and versions."""
    rows = summary["rows"]
    width = max([len("check")] + [len(row["check"]) for row in rows])
    lines = [f"dydit-bench gpu-check on {summary['device']}: torch {summary['torch']} (CUDA {summary['cuda']}), "
             f"xformers {summary['xformers']}; {summary['mode']} run, logs in {summary['out']}/logs",
             f"{'check':<{width}}  {'status':<7}  {'time (s)':>8}  numbers"]
    for row in rows:
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        lines.append(f"{row['check']:<{width}}  {row['status']:<7}  {seconds:>8}  {row['summary']}")
    counts = {status: sum(row["status"] == status for row in rows) for status in ("passed", "failed", "skipped")}
    lines.append(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                 f"in {summary['seconds']:.0f} s")
    return "\n".join(lines)
