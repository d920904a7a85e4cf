"""Atomic, resumable checkpoints: DeepSpeed state + our own per-rank state, committed by a rename.

Save protocol (architecture §2.9; torchtitan's metadata-marker rule):
1. every rank: `engine.save_checkpoint(root, tag="step-NNNNNNN.partial")` and its own
   `rank-R.json` (data-loader position, RNG states) inside that folder;
2. barrier;
3. rank 0 writes `dydit_state.json` (the commit marker), renames the folder to `step-NNNNNNN`,
   replaces `latest` atomically and prunes to `keep`.
A folder counts only with the marker and without the `.partial` suffix, so a run killed mid-save
resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dydit_scale import dist
from dydit_scale.io import atomic_write_json, atomic_write_text, save_tensors

log = logging.getLogger(__name__)
MARKER = "dydit_state.json"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.endswith(".partial") and (folder / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed step folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if is_complete(p))


def resolve_resume(policy: str, root: Path) -> Path | None:
    """`checkpoint.resume`: auto = newest complete step here (or none) | never | a step folder path."""
    if policy == "never":
        return None
    if policy == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    folder = Path(policy)
    if not is_complete(folder):
        raise ValueError(
            f"checkpoint.resume: {folder} is not a complete checkpoint; expected a step-NNNNNNN folder "
            f"holding {MARKER} (or auto | never)"
        )
    return folder


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save(engine: Any, root: Path, step: int, *, state: dict[str, Any], rank_state: dict[str, Any],
         keep: int, exclude_frozen: bool, rank_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
         before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` on every rank and commit it; returns the committed folder.

    `rank_tensors` maps file names to tensors this rank saves as safetensors (e.g. its EMA shard);
    `before_commit(folder)` runs on every rank before the commit (e.g. gathered adapter files).
    """
    final = root / step_name(step)
    partial = root / f"{step_name(step)}.partial"
    if dist.is_main():
        shutil.rmtree(partial, ignore_errors=True)  # left over by a run killed mid-save
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    for name, tensors in (rank_tensors or {}).items():
        save_tensors(partial / name, tensors)
    atomic_write_json(partial / f"rank-{dist.rank()}.json", {**rank_state, "rng": _rng_state()})
    if before_commit is not None:
        before_commit(partial)
    dist.barrier()
    if dist.is_main():
        atomic_write_json(partial / MARKER, {**state, "step": step, "world_size": dist.world_size()})
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / "latest", final.name + "\n")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s committed", final)
    dist.barrier()
    return final


def load(engine: Any, folder: Path, *, strict: bool, load_optimizer: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore DeepSpeed and RNG state from a complete step folder; returns (state, this rank's state)."""
    state = json.loads((folder / MARKER).read_text())
    rank_file = folder / f"rank-{dist.rank()}.json"
    if not rank_file.is_file():
        raise ValueError(
            f"{folder}: has no state for rank {dist.rank()} (saved with world size {state['world_size']}, "
            f"running with {dist.world_size()}); resume with checkpoint.universal=true"
        )
    path, tag = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=strict,
                                       load_optimizer_states=load_optimizer, load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"{folder}: DeepSpeed found no checkpoint files in it")
    rank_state = json.loads(rank_file.read_text())
    _set_rng_state(rank_state.pop("rng"))
    return state, rank_state
