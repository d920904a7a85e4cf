"""`dydit-bench data` runs both loaders on the same synthetic shards and reports JSON (no speed asserted)."""

from __future__ import annotations

import argparse
import json

from dydit_scale.bench import data as bench_data


def test_bench_data_json_reports_both_loaders_for_images_and_videos(capsys):
    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    args = parser.parse_args(["--json", "--count", "32", "--batch-size", "4", "--workers", "0",
                              "--resolution", "64", "--num-frames", "4", "--repeats", "1"])
    assert bench_data.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"image", "video"}
    for row in report.values():
        assert row["ours_samples_per_s"] > 0 and row["webdataset_samples_per_s"] > 0 and row["ratio"] > 0
