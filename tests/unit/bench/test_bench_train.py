"""`dydit-bench train` times static and dynamic steps side by side and measures TD-LoRA's memory."""

from __future__ import annotations

import argparse
import json

import pytest

from dydit_scale.bench import train


@pytest.mark.slow
def test_bench_train_json_reports_step_time_memory_and_trainable_share(capsys):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert train.run(parser.parse_args(["--preset", "tiny", "--steps", "2", "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    seconds = result["step_s"]
    assert set(seconds) == {"static", "dynamic_masked"} and min(seconds.values()) > 0
    assert result["step_time_ratio"] == seconds["dynamic_masked"] / seconds["static"]
    assert result["peak_memory_ratio"] > 0
    share = result["trainable_share"]
    assert share["full"] == 1.0 and 0 < share["td_lora"] < 0.5  # TD-LoRA freezes the base weights
