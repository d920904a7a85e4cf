"""Every goal a bench prints is marked met or MISSED, in the table and in --json."""

from __future__ import annotations

import pytest

from dydit_scale.bench import data, efficacy_report, infer, train
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


def _efficacy_result(dyn_loss: float, pruned_loss: float, ratio: float) -> dict:
    scores = {"heldout_loss": 0.10, "prompt_score": 0.95, "fd": 2.0}
    dynamic = {"lambda": 0.7, "arm": "dynamic", "flops_ratio": ratio, "heldout_loss": dyn_loss, "prompt_score": 0.94,
               "fd": 2.1, "train_flops_ratio": 0.71, "schedule_flops_ratio": 0.8, "token_keep_rate": 0.9,
               "undecided_share": 0.25, "token_undecided_share": 0.1}
    pruned = {"lambda": 0.7, "arm": "pruned", "flops_ratio": ratio, "heldout_loss": pruned_loss, "prompt_score": 0.9,
              "fd": 3.0}
    return {"classifier_accuracy": 0.99, "fd_real": 1.0, "static": dict(scores), "control": dict(scores),
            "rows": [dynamic, pruned],
            "preset": "default", "pretrain": {"reused": True}, "seconds": 1800.0}


def test_data_infer_efficacy_goals(capsys) -> None:
    assert data.ratio_goal(0.97).met and not data.ratio_goal(0.93).met
    rows = [{"path": "static", "efficiency": 1.0}, {"path": "fast", "efficiency": 0.85}]
    assert infer.efficiency_goal(rows).mark() == "goal >= 0.90 MISSED"
    rows[1]["efficiency"] = 0.95
    assert infer.efficiency_goal(rows).met
    goals = efficacy_report.result_goals(_efficacy_result(0.101, 0.12, 0.71))
    assert all(goal.met for goal in goals.values()), {k: g.value for k, g in goals.items()}
    assert set(goals) == {"classifier accuracy", "static prompt score", "λ 0.7: |ratio − λ|",
                          "λ 0.7: loss vs control",
                          "λ 0.7: prompt score vs control", "λ 0.7: loss, pruned − dynamic",
                          "λ 0.7: FD, pruned − dynamic", "minutes"}
    result = _efficacy_result(0.15, 0.12, 0.80)  # loss +50 % and worse than pruning; ratio off by 0.10
    goals = efficacy_report.result_goals(result)
    missed = {name for name, goal in goals.items() if not goal.met}
    assert missed == {"λ 0.7: |ratio − λ|", "λ 0.7: loss vs control", "λ 0.7: loss, pruned − dynamic"}
    result.update(finetune_steps=10, sampler={"samples": 8, "steps": 4, "guidance": 2.0}, out="x")
    result["pretrain"].update(steps=10)
    for row in result["rows"]:
        row["speedup"] = 1.0
    efficacy_report.print_table(result)
    lines = capsys.readouterr().out.splitlines()
    ratio_line = next(line for line in lines if line.startswith("  λ 0.7: |ratio − λ|"))
    assert "MISSED" in ratio_line and "trained at 0.710" in ratio_line and "|z| < 2: 25%" in ratio_line
