"""Resuming at another world size without the universal path is a one-line user error, not a
DeepSpeed traceback (the end-to-end universal resume is in test_multinode.py)."""

from __future__ import annotations

import json

import pytest

from dydit_scale.config import RecipeError
from dydit_scale.train import checkpoint


def test_a_world_size_change_without_universal_is_a_one_line_recipe_error(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    folder = tmp_path / "step-0000002"
    folder.mkdir()
    (folder / checkpoint.MARKER).write_text(json.dumps({"step": 2, "world_size": 2}))
    for rank in (0, 1):
        (folder / f"rank-{rank}.json").write_text("{}")
    with pytest.raises(RecipeError) as err:
        checkpoint.load(object(), folder, strict=True)  # the engine is never reached
    message = str(err.value)
    assert "\n" not in message
    assert "world size 2" in message and "checkpoint.universal=true" in message
