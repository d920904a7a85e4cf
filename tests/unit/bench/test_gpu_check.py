"""`dydit-bench gpu-check` without a GPU: the no-CUDA error, reading canned sub-step outputs into the
table and JSON, the step runner's failures and timeouts, and the whole check at tiny sizes on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dydit_scale.bench import gpu_check, main
from dydit_scale.bench.gpu_check_report import (infer_values, parity_rows, render_table, summary_json,
                                                train_values)
from dydit_scale.bench.gpu_check_steps import Outcome, Row, Step, run_steps, single_row

REPO = Path(__file__).resolve().parents[3]
ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "cuda": "12.6", "xformers": "0.0.35"}


def test_without_cuda_it_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["gpu-check", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--allow-cpu" in err
    assert not (tmp_path / "out").exists()


def test_launcher_help_and_no_cuda_error():
    help_text = subprocess.run(["bash", "launchers/gpu_check.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_text.returncode == 0 and "launchers/gpu_check.sh --allow-cpu" in help_text.stdout
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    no_gpu = subprocess.run(["bash", "launchers/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert no_gpu.returncode == 2 and no_gpu.stderr.strip().startswith("dydit-bench gpu-check: torch sees no CUDA")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="6">
<testcase classname="tests.gpu.test_fast_path_gpu" name="test_tdw[sdpa-flux]" time="1"/>
<testcase classname="tests.gpu.test_fast_path_gpu" name="test_released[sdpa-flux-dev]" time="1"/>
<testcase classname="tests.gpu.test_fast_path_gpu" name="test_tdw[xformers-flux]" time="1">
  <failure message="AssertionError: |fast - masked| / |masked| = 2.1e-01 &gt; 4.5e-02&#10;more">trace</failure>
</testcase>
<testcase classname="tests.gpu.test_fast_path_gpu" name="test_released[xformers-flux-dev]" time="1"/>
<testcase classname="tests.gpu.test_fast_path_gpu" name="test_tdw[other]" time="1">
  <skipped type="pytest.skip" message="needs CUDA">skip</skipped>
</testcase>
</testsuite></testsuites>"""


def _parity_files(tmp_path: Path) -> tuple[Path, Path]:
    junit, log = tmp_path / "parity.xml", tmp_path / "parity.jsonl"
    junit.write_text(JUNIT)
    records = [dict(backend="sdpa", dtype="bf16", max_abs_diff=0.01),
               dict(backend="sdpa", dtype="bf16", max_abs_diff=0.03),
               dict(backend="sdpa", dtype="fp32", max_abs_diff=2e-6),
               dict(backend="xformers", dtype="bf16", max_abs_diff=0.2)]
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    return junit, log


def test_parity_rows_per_backend_from_junit_and_the_log(tmp_path):
    junit, log = _parity_files(tmp_path)
    sdpa, xformers = parity_rows(Outcome(1, False, 12.0, tmp_path / "p.log"), junit, log)
    assert (sdpa.check, sdpa.status) == ("parity sdpa", "passed")
    assert sdpa.values["max_abs_diff_bf16"] == 0.03 and sdpa.values["max_abs_diff_fp32"] == 2e-6
    assert "bf16 max|fast-masked| 3.00e-02" in sdpa.summary and "2 passed" in sdpa.summary
    assert xformers.status == "failed" and xformers.values["cases"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert "test_tdw[xformers-flux]: AssertionError: |fast - masked|" in xformers.summary
    assert "more" not in xformers.summary  # the message's first line only


def test_parity_rows_when_every_case_is_skipped_or_pytest_timed_out(tmp_path):
    junit = tmp_path / "parity.xml"
    junit.write_text('<testsuites><testsuite><testcase name="t[xformers-latte]">'
                     '<skipped message="xformers needs CUDA"/></testcase></testsuite></testsuites>')
    _, xformers = parity_rows(Outcome(0, False, 3.0, tmp_path / "p.log"), junit, tmp_path / "missing.jsonl")
    assert xformers.status == "skipped" and xformers.summary == "xformers needs CUDA"
    junit.unlink()
    rows = parity_rows(Outcome(None, True, 150.0, tmp_path / "p.log"), junit, tmp_path / "missing.jsonl")
    assert [row.status for row in rows] == ["failed", "failed"] and "timed out after 150 s" in rows[0].summary


def _infer_json(path: Path) -> Path:
    rows = [dict(path="static", s_per_step=0.02, flops_ratio=1.0, speedup=1.0, efficiency=1.0),
            dict(path="masked", s_per_step=0.021, flops_ratio=0.5, speedup=0.95, efficiency=0.48),
            dict(path="fast", s_per_step=0.011, flops_ratio=0.5, speedup=1.82, efficiency=0.91)]
    result = dict(rows=rows, max_abs_diff_fast_vs_masked=0.004,
                  goal_checks={"fast_efficiency": {"value": 0.91, "goal": ">= 0.9", "met": True}})
    path.write_text(json.dumps(result))
    return path


def _metrics(path: Path) -> Path:
    lines = [dict(step=1, loss=0.61, flops_ratio=0.98, step_s=2.5, samples_per_s=0.4, max_cuda_gb=35.2,
                  max_rss_gb=12.5)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_infer_and_train_values(tmp_path):
    values, summary = infer_values(_infer_json(tmp_path / "infer.json"))
    assert values["speedup"] == 1.82 and values["efficiency"] == 0.91 and values["static_s_per_step"] == 0.02
    assert summary.startswith("fast: speed-up 1.82, efficiency 0.91, FLOPs ratio 0.500, 11.00 ms/step (static 20.00)")
    assert summary.endswith("fast_efficiency >= 0.9 met")
    values, summary = train_values(_metrics(tmp_path / "metrics.jsonl"))
    assert values["step_s"] == pytest.approx(2.5) and values["max_cuda_gb"] == 35.2
    assert summary == "loss 0.6100, step 2.50 s, peak CUDA 35.2 GB, peak RSS 12.5 GB"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics line"):
        train_values(tmp_path / "empty.jsonl")


def test_table_and_json_from_canned_rows(tmp_path):
    junit, log = _parity_files(tmp_path)
    rows = parity_rows(Outcome(1, False, 12.0, tmp_path / "p.log"), junit, log)
    ok = Outcome(0, False, 30.0, tmp_path / "i.log")
    rows += single_row("infer flux-dev sdpa", lambda: infer_values(_infer_json(tmp_path / "i.json")))(ok)
    rows += single_row("train: step", lambda: train_values(_metrics(tmp_path / "m.jsonl")))(ok)
    rows.append(Row("infer latte-1 xformers", "skipped", None, {}, "xformers is not installed"))
    summary = summary_json(rows, ENV, mode="full", out="runs/gpu_check", seconds=321.0)
    assert summary["passed"] is False and json.loads(json.dumps(summary))["rows"][0]["check"] == "parity sdpa"
    lines = render_table(summary).splitlines()
    assert lines[0].startswith("dydit-bench gpu-check on NVIDIA H100 80GB HBM3: torch 2.13.0 (CUDA 12.6), "
                               "xformers 0.0.35; full run")
    assert lines[1].split() == ["check", "status", "time", "(s)", "numbers"]
    assert lines[4].split()[:4] == ["infer", "flux-dev", "sdpa", "passed"] and "speed-up 1.82" in lines[4]
    assert "peak CUDA 35.2 GB" in lines[5] and lines[6].split()[3:5] == ["skipped", "-"]
    assert lines[-1] == "3 passed, 1 failed, 1 skipped in 321 s"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_failed_or_timed_out_step_is_recorded_and_the_rest_still_run(tmp_path):
    marker = tmp_path / "ok.txt"
    child = tmp_path / "child.pid"
    sleeper = ("import subprocess, sys, time; "
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    steps = [
        Step(["fails"], _python("import sys; print('boom: bad input', file=sys.stderr); sys.exit(3)"), 30,
             single_row("fails", lambda: ({}, "unreachable"))),
        Step(["hangs"], _python(sleeper), 2, single_row("hangs", lambda: ({}, "unreachable"))),
        Step(["after"], _python("print('{\"x\": 1}')"), 30,
             single_row("after", lambda: (json.loads(marker.read_text()), "read")), stdout=marker),
        Step(["needs fails"], _python("pass"), 30, single_row("needs fails", lambda: ({}, "")), needs=("fails",)),
        Step(["unreadable"], _python("pass"), 30, single_row("unreadable", lambda: json.loads("not json"))),
    ]
    started = time.monotonic()
    rows = run_steps(steps, tmp_path / "logs", dict(os.environ), tmp_path, budget_s=120, progress=lambda line: None)
    assert time.monotonic() - started < 30
    by_check = {row.check: row for row in rows}
    assert by_check["fails"].status == "failed" and by_check["fails"].summary.startswith("exit 3: boom: bad input")
    assert by_check["hangs"].status == "failed" and "timed out after 2 s" in by_check["hangs"].summary
    assert not _alive(int(child.read_text()))  # the timed-out step's child went with its process group
    assert (by_check["after"].status, by_check["after"].values) == ("passed", {"x": 1})
    assert (by_check["needs fails"].status, by_check["needs fails"].summary) == ("skipped", "needs fails")
    unreadable = by_check["unreadable"]
    assert unreadable.status == "failed" and "unreadable output: JSONDecodeError" in unreadable.summary
    assert (tmp_path / "logs" / "01-fails.log").read_text().startswith("$ ")


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    steps = [Step(["slow"], _python("import time; time.sleep(1)"), 30, single_row("slow", lambda: ({}, ""))),
             Step(["late"], _python("pass"), 30, single_row("late", lambda: ({}, "")))]
    # the second step would start with under 20 s left
    rows = run_steps(steps, tmp_path, dict(os.environ), tmp_path, budget_s=20.5, progress=lambda line: None)
    assert [row.status for row in rows] == ["passed", "skipped"] and "budget of 20 s is spent" in rows[1].summary


def test_training_images_are_large_enough_for_the_resolution(tmp_path):
    assert main(["gpu-check", "--write-images", str(tmp_path), "--image-side", "96"]) == 0
    from PIL import Image

    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == gpu_check.IMAGES and Image.open(pngs[0]).size == (96, 96)
    assert (tmp_path / "000000.txt").read_text().startswith("a ")


def test_plan_on_cpu_names_every_check_and_honours_skip(tmp_path):
    steps = gpu_check.plan(tmp_path, "cpu", True, ["infer"], 2)
    checks = [check for step in steps for check in step.checks]
    assert checks == ["parity sdpa", "parity xformers", "infer tiny-flux sdpa", "infer tiny-flux xformers",
                      "infer tiny sdpa", "infer tiny xformers", "train: model", "train: images", "train: shards",
                      "train: step"]
    assert all(step.skip == "left out (--skip)" for step in steps if step.checks[0].startswith("infer"))
    train = steps[-1]
    assert train.needs == ("train: model", "train: shards") and "data.resolution=32" in train.command
    full = gpu_check.plan(tmp_path, "cuda", False, [], 3)
    assert [step.checks[0] for step in full][1:3] == ["infer flux-dev sdpa", "infer flux-dev xformers"]
    assert full[1].command[-2:] == ["--resolution", "1024"]  # FLUX at its released 1024², not the CPU default
    assert "data.resolution=1024" in full[-1].command and "model.dtype=fp32" not in full[-1].command
    assert full[-4].command[-6:] == ["--dtype", "bf16", "--layers", "3", "--text-layers", "1"]
    assert full[-3].command[-2:] == ["--image-side", "1024"] and full[-2].needs == ("train: images",)


@pytest.mark.slow
def test_the_whole_check_runs_on_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, "-m", "dydit_scale.bench", "gpu-check", "--allow-cpu", "--json",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    status = {row["check"]: row["status"] for row in summary["rows"]}
    assert status == {"parity sdpa": "passed", "parity xformers": "skipped", "infer tiny-flux sdpa": "passed",
                      "infer tiny-flux xformers": "skipped", "infer tiny sdpa": "passed",
                      "infer tiny xformers": "skipped",
                      "train: model": "passed", "train: images": "passed", "train: shards": "passed",
                      "train: step": "passed"}
    rows = {row["check"]: row for row in summary["rows"]}
    assert rows["parity sdpa"]["values"]["cases"]["passed"] >= 6
    assert 0 < rows["infer tiny sdpa"]["values"]["flops_ratio"] < 1
    train = rows["train: step"]["values"]
    assert math.isfinite(train["loss"]) and train["step_s"] > 0 and train["max_rss_gb"] > 0
    assert train["max_cuda_gb"] is None and "peak CUDA n/a" in rows["train: step"]["summary"]
    assert summary["device"] == "CPU" and summary["mode"] == "quick"
