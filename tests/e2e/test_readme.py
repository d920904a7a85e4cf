"""The README's two fresh-machine commands stay true (litgpt's test_readme)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Two commands for a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]


def test_readme_gives_the_demo_and_the_test_command_and_ci_runs_the_latter():
    assert _readme_commands() == ["bash launchers/demo_cpu.sh", "bash tests/run.sh"]
    assert "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_demo_command_runs_with_tiny_settings(tmp_path):
    command = _readme_commands()[0]
    env = {**os.environ, "DEMO_DIR": str(tmp_path), "STEPS": "4", "NGPU": "2", "BENCH_PRESET": "tiny"}
    result = subprocess.run(["timeout", "600", *command.split()], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "demo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step-0000004" / "td_lora.safetensors").is_file()
    assert "FLOPs ratio: step 1" in result.stdout
    assert (run / "schedule" / "schedule.json").is_file() and (run / "schedule" / "schedule.png").is_file()
    assert (run / "fast_samples" / "samples.png").is_file() and (run / "fast_samples" / "compute_map.png").is_file()
    assert "efficiency" in result.stdout
