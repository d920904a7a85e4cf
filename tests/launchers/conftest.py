"""Fixtures for the launcher tests: the tiny FLUX folder (tests/conftest.py) and identical-sample shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import COMMON, launch


@pytest.fixture(scope="session")
def same_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("same_shards")
    launch.write_identical_shards(out, shards=4, per_shard=8)
    return out


@pytest.fixture(scope="session")
def base_overrides(tiny_model_dir, same_shards) -> list[str]:
    return [*COMMON, f"model.path={tiny_model_dir('flux')}", f"data.shards={same_shards}"]
