"""`dydit-bench infer` runs the three paths on the same inputs and reports the table's fields."""

from __future__ import annotations

import argparse
import json

from dydit_scale.bench import infer


def test_bench_infer_json_reports_static_masked_and_fast(capsys):
    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    assert infer.run(parser.parse_args(["--preset", "tiny", "--steps", "2", "--repeats", "1", "--json",
                                        "--threads", "1"])) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["path"]: row for row in result["rows"]}
    assert list(rows) == ["static", "masked", "fast"]
    assert rows["static"]["flops_ratio"] == 1.0 and rows["fast"]["flops_ratio"] < 1.0
    assert rows["fast"]["flops_ratio"] == rows["masked"]["flops_ratio"]
    for row in rows.values():
        assert row["efficiency"] == row["speedup"] * row["flops_ratio"] and row["s_per_step"] > 0
    assert result["max_abs_diff_fast_vs_masked"] < 1e-5
