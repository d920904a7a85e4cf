"""`dydit-bench efficacy --preset tiny`: the whole pipeline end to end, in seconds."""

from __future__ import annotations

import argparse
import json

import pytest

from dydit_scale.bench import BENCHES, efficacy


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    efficacy.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_registered() -> None:
    assert BENCHES["efficacy"] == "dydit_scale.bench.efficacy"


@pytest.mark.slow
def test_tiny_preset_json(tmp_path, capsys) -> None:
    out = tmp_path / "efficacy"
    assert efficacy.run(_args("--preset", "tiny", "--json", "--out", str(out), "--threads", "2")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((out / "efficacy.json").read_text())
    assert (out / "efficacy.png").stat().st_size > 0 and (out / "samples.png").is_file()
    assert result["pretrain"]["steps"] <= 100 and result["finetune_steps_per_lambda"] >= 1
    (row,) = result["rows"]
    for key in ("lambda", "flops_ratio", "heldout_loss", "static_heldout_loss", "psnr_vs_static", "speedup"):
        assert isinstance(row[key], float), key
    assert row["lambda"] == 0.5
    assert 0.0 < row["flops_ratio"] < 1.0  # the routers moved and the exported schedule drops units
    assert row["heldout_loss"] > 0 and row["static_heldout_loss"] > 0 and row["speedup"] > 0
    assert row["static_heldout_loss"] == result["static_heldout_loss"]
