"""Shared fixtures: tiny model folders, and autouse resets of global state (litgpt style)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch


@pytest.fixture(autouse=True)
def _reset_global_state(monkeypatch):
    """fp32 default dtype, fixed seed, offline hub, and no process group left behind."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
