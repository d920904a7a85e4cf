"""The first launch says that DeepSpeed compiles its shared-memory op, and only while it is not built."""

from __future__ import annotations

import pytest

from dydit_scale.train.engine import _optimizer_builder, jit_build_note


def test_note_until_the_library_is_built(tmp_path, monkeypatch) -> None:
    import deepspeed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    if not deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"):
        pytest.skip("DeepSpeed's shared-memory op is not used on this accelerator")
    note = jit_build_note("ShareMemCommBuilder")
    assert note is not None and "deepspeed_shm_comm" in note and str(tmp_path) in note
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert jit_build_note("ShareMemCommBuilder") is None


def test_optimizer_op_only_without_torch_adam() -> None:
    adam = {"optimizer": {"params": {"torch_adam": True}}, "zero_optimization": {}}
    assert _optimizer_builder(adam) is None
    adam["optimizer"]["params"]["torch_adam"] = False
    assert _optimizer_builder(adam) == "FusedAdamBuilder"
    adam["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    assert _optimizer_builder(adam) == "CPUAdamBuilder"
