"""Run files are written atomically, readable by the rest of a shared filesystem's users, and a damaged
file is one line naming it."""

from __future__ import annotations

import os

import pytest
import torch

from dydit_scale.io import UnreadableFileError, atomic_write_json, load_tensors, save_tensors


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path, umask_022):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "b.safetensors", {"x": torch.ones(3)})
    for name in ("a.json", "b.safetensors"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o644), name


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"x": torch.ones(64)})
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(UnreadableFileError) as err:
        load_tensors(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
