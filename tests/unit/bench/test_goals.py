"""Every goal a bench prints is marked met or MISSED, in the table and in --json."""

from __future__ import annotations

import pytest

from dydit_scale.bench import data, efficacy, infer, train
from dydit_scale.bench.goals import Goal


@pytest.mark.parametrize(("value", "met"), [(1.05, True), (1.10, True), (1.15, False)])
def test_goal_at_most(value: float, met: bool) -> None:
    goal = Goal(value, "<=", 1.10, "1.10")
    assert goal.met is met
    assert goal.mark() == f"goal <= 1.10 {'met' if met else 'MISSED'}"
    assert goal.as_json() == {"value": value, "goal": "<= 1.1", "met": met}


def test_goal_at_least() -> None:
    assert Goal(0.96, ">=", 0.95).mark() == "goal >= 0.95 met"
    assert Goal(0.94, ">=", 0.95).mark() == "goal >= 0.95 MISSED"


def _train_result(step_ratio: float, memory_ratio: float, share: float) -> dict:
    return {"preset": "tiny", "threads": 1, "step_s": {"static": 1.0, "dynamic_masked": step_ratio},
            "step_time_ratio": step_ratio, "peak_memory_bytes": {"full": 2**20, "td_lora": 2**19},
            "peak_memory_ratio": memory_ratio, "trainable_share": {"full": 1.0, "td_lora": share}}


def test_train_table_marks_each_goal() -> None:
    lines = train._table(_train_result(1.05, 0.7, 0.02)).splitlines()
    row = {line.split("  ")[0]: line for line in lines}
    assert row["dynamic ÷ static"].endswith("goal <= 1.10 met")
    assert row["TD-LoRA ÷ full"].endswith("goal <= 0.60 MISSED")
    assert row["trainable share, TD-LoRA"].endswith("goal <= 3 % met")
    lines = train._table(_train_result(1.2, 0.5, 0.04)).splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines if "goal" in line] == ["MISSED", "met", "MISSED"]
    checks = train.goals(_train_result(1.2, 0.5, 0.04))
    assert [checks[k].met for k in ("step_time_ratio", "peak_memory_ratio", "td_lora_trainable_share")] == [
        False, True, False]


def test_data_infer_efficacy_goals() -> None:
    assert data.ratio_goal(0.97).met and not data.ratio_goal(0.93).met
    rows = [{"path": "static", "efficiency": 1.0}, {"path": "fast", "efficiency": 0.85}]
    assert infer.efficiency_goal(rows).mark() == "goal >= 0.90 MISSED"
    rows[1]["efficiency"] = 0.95
    assert infer.efficiency_goal(rows).met
    row = {"lambda": 0.5, "flops_ratio": 0.52, "heldout_loss_rel": 0.3}
    assert efficacy._goal_marks(row) == "ratio met, loss MISSED"
    row.update(flops_ratio=0.6, heldout_loss_rel=0.01)
    assert efficacy._goal_marks(row) == "ratio MISSED, loss met"
