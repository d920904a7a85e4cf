"""Shared fixtures: tiny model folders, and autouse resets of global state (litgpt style)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

_DEEPSPEED_SESSION = False  # set once `deepspeed_world1` owns this process's group


@pytest.fixture(autouse=True)
def _reset_global_state(monkeypatch):
    """fp32 default dtype, fixed seed, offline hub, and no process group left behind.

    The one exception is the session-wide single-rank DeepSpeed group (`deepspeed_world1`):
    DeepSpeed caches its communicator and cannot be initialised twice in one process.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    if not _DEEPSPEED_SESSION and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A free TCP port on loopback (for MASTER_PORT / rendezvous in tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def deepspeed_world1():
    """DeepSpeed initialised in this process as a world of one rank (gloo, CPU accelerator)."""
    import deepspeed

    from dydit_scale.train.env import unlink_shm_allreduce_buffer

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    unlink_shm_allreduce_buffer()
    global _DEEPSPEED_SESSION
    _DEEPSPEED_SESSION = True
    yield deepspeed
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(family)`: a random-init tiny diffusers pipeline folder, written once per session."""
    from dydit_scale.models.tiny import write_tiny_pipeline

    folders: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in folders:
            out = tmp_path_factory.mktemp(f"tiny_{family}")
            write_tiny_pipeline(family, str(out))
            folders[family] = str(out)
        return folders[family]

    return get


@pytest.fixture(scope="session")
def replica_folder(tmp_path_factory):
    """`replica_folder(name, layers=None, text_layers=1, dtype="fp32") -> Path`: a released pipeline at
    its real widths with random weights (`write_replica`), written once per session for each distinct
    set of arguments. The folders are GBs, so they are deleted when the session ends."""
    import shutil
    from pathlib import Path

    from dydit_scale.models.registry import get_replica
    from dydit_scale.models.replica_write import write_replica

    folders: dict[tuple, Path] = {}

    def get(name: str, layers: int | None = None, text_layers: int = 1, dtype: str = "fp32") -> Path:
        layers = get_replica(name)[1].default_layers if layers is None else layers
        key = (name, layers, text_layers, dtype)
        if key not in folders:
            out = tmp_path_factory.mktemp(f"replica_{name}")
            folders[key] = write_replica(name, out, layers=layers, text_layers=text_layers, dtype=dtype)
        return folders[key]

    yield get
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
