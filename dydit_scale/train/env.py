"""Process-group start-up under any launcher, and the run's own files: `recipe.yaml` and `env.json`
(versions, world size, git SHA)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from dydit_scale import dist
from dydit_scale.config import Recipe
from dydit_scale.io import atomic_write_json, atomic_write_text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(recipe: Recipe) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA).

    `deepspeed`, `torchrun` set RANK/WORLD_SIZE/MASTER_*; under `srun` the SLURM variables are mapped;
    a plain `dydit-train` becomes a world of one on loopback (DeepSpeed would otherwise try MPI).
    """
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        unlink_shm_allreduce_buffer()
    dist.setup_logging()


def unlink_shm_allreduce_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer in /dev/shm.

    DeepSpeed's CPU accelerator maps a 69 MB shared-memory segment per rank and never unlinks it,
    so every run left one in /dev/shm (RAM) for good. Once every rank has mapped its peers' segments
    (they do inside `init_distributed`; the barrier makes sure all got there) the names are no longer
    needed; the mappings stay valid until the processes exit, and then the memory is freed.
    """
    if torch.cuda.is_available():
        return
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), dist.rank())
    Path("/dev/shm", name).unlink(missing_ok=True)


def launch_world_size() -> int:
    """The world size `init_distributed` will see, read from the launcher's environment before any
    process group exists (so start-up checks can refuse a launch without a rendezvous)."""
    if "RANK" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1"))
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_env(path: Path) -> None:
    """Versions of the stack, git SHA, host and world size, for reproducing a run."""
    packages = ("torch", "deepspeed", "diffusers", "transformers", "peft", "webdataset", "dydit_scale")
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    atomic_write_json(path, {"versions": versions, "python": platform.python_version(), "git_sha": _git_sha(),
                             "host": socket.gethostname(), "world_size": dist.world_size(),
                             "cuda": torch.cuda.is_available()})


def keep_earlier_recipe(run_dir: Path, text: str) -> None:
    """Write `run_dir/recipe.yaml`; a different earlier one is kept as `recipe.N.yaml` (N = 1, 2, ...),
    since the checkpoints it produced are exported with the recipe they were trained with."""
    current = run_dir / "recipe.yaml"
    if current.is_file():
        if current.read_text() == text:
            return
        n = 1
        while (run_dir / f"recipe.{n}.yaml").exists():
            n += 1
        os.replace(current, run_dir / f"recipe.{n}.yaml")
    atomic_write_text(current, text)
