"""The launcher scripts' command lines, without launching (DEEPSPEED=echo, DRY_RUN=1): knobs, usage
errors, the pdsh .deepspeed_env, the λ sweep's job array."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cluster import REPO, RECIPE, launch_env


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "60", "bash", f"launchers/{script}", *args], cwd=REPO, env=launch_env(**env),
                          capture_output=True, text=True)


def test_usage_errors_exit_2_with_the_header():
    for script in ("train_node.sh", "train_hostfile.sh", "submit.sh", "sweep.sh"):
        out = _run(script)
        assert out.returncode == 2 and "launchers/" in out.stdout, script


def test_train_node_runs_the_deepspeed_launcher_on_the_module():
    out = _run("train_node.sh", str(RECIPE), "train.steps=3", DEEPSPEED="echo", NGPU="4", MASTER_PORT="29123")
    assert out.returncode == 0
    assert out.stdout.split() == ["--num_gpus", "4", "--master_port", "29123", "--module", "dydit_scale.train",
                                  str(RECIPE), "train.steps=3"]


def test_train_hostfile_no_ssh_and_pdsh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\nnode-a slots=2  # first\n\nnode-b slots=3\n")
    out = _run("train_hostfile.sh", str(RECIPE), DEEPSPEED="echo", HOSTFILE=str(hostfile), NO_SSH="1",
               NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert " ".join(words[words.index("--num_gpus"):][:2]) == "--num_gpus 3"  # node-b's slots
    for pair in ("--no_ssh --num_nodes 2", "--node_rank 1 --master_addr 10.0.0.1"):
        assert pair in out.stdout
    missing = _run("train_hostfile.sh", str(RECIPE), DEEPSPEED="echo", HOSTFILE=str(hostfile), NO_SSH="1")
    assert missing.returncode == 2 and "NODE_RANK" in missing.stderr
    pdsh = _run("train_hostfile.sh", str(RECIPE), DEEPSPEED="echo", HOSTFILE=str(hostfile), DS_ACCELERATOR="cpu",
                HOME=str(tmp_path), TMPDIR=str(tmp_path))
    assert pdsh.returncode == 0 and "--master_addr node-a" in pdsh.stdout and "--no_ssh" not in pdsh.stdout
    written = next(Path(tmp_path).glob("dydit-deepspeed_env.*")).read_text()
    assert "DS_ACCELERATOR=cpu" in written and "OMP_NUM_THREADS=1" in written


def test_submit_and_sweep_build_the_sbatch_command(tmp_path):
    common = [str(RECIPE), "2", f"run.output_dir={tmp_path}", "run.name=r"]
    out = _run("submit.sh", *common, DRY_RUN="1", GPUS_PER_NODE="8", TIME="1:00:00")
    assert out.returncode == 0, out.stderr
    for part in ("--nodes=2", "--gpus-per-node=8", "--time=1:00:00", "--signal=B:USR1@300", "--requeue",
                 f"--output={tmp_path}/r/slurm/%x-%j.out", "launchers/slurm.sbatch"):
        assert part in out.stdout, part
    bad = _run("submit.sh", str(RECIPE), "2", "optim.lr=-1", DRY_RUN="1")
    assert bad.returncode == 2 and "optim.lr" in bad.stderr and "Traceback" not in bad.stderr
    sweep = _run("sweep.sh", str(RECIPE), "1", "0.4 0.6 0.8", f"run.output_dir={tmp_path}", "run.name=s", DRY_RUN="1")
    assert sweep.returncode == 0, sweep.stderr
    assert "--array=0-2" in sweep.stdout and f"--output={tmp_path}/s-sweep/slurm/%x-%A_%a.out" in sweep.stdout
    assert _run("sweep.sh", str(RECIPE), "1", "0.4 high", DRY_RUN="1").returncode == 2
