"""`dydit-bench efficacy --preset tiny`: the whole protocol end to end on a toy model (plumbing, not goals)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dydit_scale.bench import efficacy
from dydit_scale.bench.efficacy_report import result_goals


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    efficacy.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_tiny_preset_json_then_reuse_static(tmp_path, capsys) -> None:
    out = tmp_path / "efficacy"
    # routers that start undecided and learn fast, so that 30 steps move them (the goals need the default preset)
    common = ("--preset", "tiny", "--json", "--out", str(out), "--threads", "1", "--workers", "2",
              "--finetune-steps", "30", "--router-lr-scale", "50", "--head-router-bias", "0.5",
              "--token-router-bias", "0.5")
    assert efficacy.run(_args(*common)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((out / "efficacy.json").read_text())
    assert (out / "efficacy.png").stat().st_size > 0 and (out / "samples.png").is_file()
    assert (out / "static" / "config.json").is_file() and not result["pretrain"]["reused"]
    assert 0.0 <= result["classifier_accuracy"] <= 1.0 and result["fd_real"] >= 0.0
    for key in ("heldout_loss", "prompt_score", "fd"):
        assert isinstance(result["static"][key], float) and isinstance(result["control"][key], float)
    assert result["control"]["steps"] == 30
    dynamic, pruned = result["rows"]
    assert (dynamic["arm"], pruned["arm"]) == ("dynamic", "pruned")
    for row in (dynamic, pruned):
        assert set(row) >= {"lambda", "arm", "flops_ratio", "heldout_loss", "prompt_score", "fd", "speedup"}
        assert row["lambda"] == 0.5 and row["speedup"] > 0
    assert 0.0 < dynamic["flops_ratio"] < 1.0  # the routers moved: the model really skips work
    assert abs(pruned["flops_ratio"] - dynamic["flops_ratio"]) < 0.15  # pruned to the same FLOPs
    assert set(result["goal_checks"]) == set(result_goals(result))
    assert (out / "schedule-lam0.5" / "schedule.safetensors").is_file()

    # --static reuses the saved model; one worker in this process gives the same numbers as two processes;
    # --cache adds the cached arms (threshold 100: every step after the 2 warm-up steps is reused; 1e-6: none)
    again_args = [*common, "--static", str(out / "static"), "--cache", "--cache-threshold", "100", "1e-6",
                  "--cache-warmup", "2"]
    again_args[again_args.index("--workers") + 1] = "1"
    assert efficacy.run(_args(*again_args)) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["pretrain"]["reused"]
    for key in ("heldout_loss", "prompt_score", "fd"):
        assert again["static"][key] == result["static"][key], key
    for key in ("flops_ratio", "heldout_loss", "prompt_score", "fd"):
        assert again["rows"][0][key] == pytest.approx(result["rows"][0][key], rel=1e-5), key
    cached = again["cache"]["rows"]
    settings = ["dbcache 100", "dbcache 1e-06"]
    assert list(cached) == [f"{name}{f' + {setting}' if setting else ''}" for name in ("static", "dynamic λ=0.5")
                            for setting in ["", *settings]]
    assert cached["static"]["fd"] == again["static"]["fd"] and cached["static"]["speedup"] == 1.0
    for name in ("static", "dynamic λ=0.5"):
        assert cached[f"{name} + dbcache 100"]["cached_share"] == 0.5
        assert cached[f"{name} + dbcache 1e-06"]["cached_share"] == 0.0
        assert cached[f"{name} + dbcache 1e-06"]["fd"] == pytest.approx(cached[name]["fd"], rel=1e-4)
    assert cached["dynamic λ=0.5 + dbcache 100"]["agreement_with_static"] == 1.0
    assert {"λ 0.5 + dbcache 100: speed-up ÷ (cache × fast)"} <= set(again["goal_checks"])


def test_static_from_another_preset_is_refused(tmp_path) -> None:
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / efficacy.STATIC_RECORD).write_text(json.dumps({"identity": {"size": 99}, "pretrain": {}}))
    with pytest.raises(SystemExit, match="was trained for"):
        efficacy.measure(_args("--preset", "tiny", "--out", str(tmp_path / "o"), "--static", str(tmp_path / "static")))
    with pytest.raises(SystemExit, match="no efficacy_static.json"):
        efficacy.measure(_args("--preset", "tiny", "--out", str(tmp_path / "o"), "--static", str(tmp_path)))


def test_a_cache_the_bench_model_cannot_run_is_refused_before_training(tmp_path) -> None:
    with pytest.raises(SystemExit, match="^efficacy: --cache: warmup 1: taylorseer extrapolates"):
        efficacy.measure(_args("--preset", "tiny", "--out", str(tmp_path), "--cache", "taylorseer"))
    with pytest.raises(SystemExit, match="^efficacy: --cache: fn 2 [+] bn 0 blocks always run, but transformer_blocks has 2"):
        efficacy.measure(_args("--preset", "tiny", "--out", str(tmp_path), "--cache", "--cache-fn", "2"))
    assert not any(tmp_path.iterdir())


def _workers_of(pid: int) -> list[int]:
    """Process ids of the multiprocessing workers whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"--multiprocessing-fork" in cmdline:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whatever init this machine has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_killing_the_bench_stops_its_fine_tuning_workers(tmp_path) -> None:
    argv = [sys.executable, "-m", "dydit_scale.bench", "efficacy", "--preset", "tiny", "--out", str(tmp_path),
            "--finetune-steps", "1000000", "--workers", "2", "--threads", "1"]
    bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(workers := _workers_of(bench.pid)) < 2:
            assert time.monotonic() < deadline and bench.poll() is None, "the bench never started its workers"
            time.sleep(0.5)
    finally:
        bench.kill()
        bench.wait(timeout=30)
    deadline = time.monotonic() + 20
    while alive := [pid for pid in workers if _running(pid)]:
        if time.monotonic() > deadline:
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {alive} kept running 20 s after the bench was killed")
        time.sleep(0.5)
