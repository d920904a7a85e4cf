"""Atomic, resumable checkpoints: DeepSpeed state + our own per-rank state, committed by a rename.

Save protocol (torchtitan's metadata-marker rule):
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
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dydit_scale import dist
from dydit_scale.config import RecipeError
from dydit_scale.io import atomic_write_json, atomic_write_text, save_tensors

log = logging.getLogger(__name__)
MARKER = "dydit_state.json"
UNIVERSAL = "universal"  # ds_to_universal output, inside the step folder (pruned with it)


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
        raise RecipeError([
            f"checkpoint.resume: {folder} is not a complete checkpoint; expected a step-NNNNNNN folder "
            f"holding {MARKER} (or auto | never)"
        ])
    return folder


def read_marker(folder: Path) -> dict[str, Any]:
    """The commit marker of a complete step folder (step, world size, what the run trains)."""
    return json.loads((folder / MARKER).read_text())


def remove_partials(root: Path) -> None:
    """Remove `.partial` folders: saves that never committed; a later save of that step rewrites it."""
    for folder in sorted(root.glob("step-*.partial")) if root.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, an unfinished save", folder)


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


def to_universal(folder: Path) -> Path:
    """`folder/universal`: DeepSpeed's world-size-free layout of a step folder, converted once (rank 0,
    DeepSpeed's `ds_to_universal --inject_missing_state`, weights-only: see safe_load) and reused afterwards."""
    from dydit_scale.train import safe_load

    out = folder / UNIVERSAL
    if dist.is_main() and not (out / "zero").is_dir():
        tmp = folder / f"{UNIVERSAL}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, "-m", "dydit_scale.train.safe_load", "--input_folder", str(folder),
                   "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
        result = subprocess.run(command, capture_output=True, text=True, env=safe_load.safe_env())
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RecipeError([f"checkpoint.universal: converting {folder} failed: {tail[0]}"])
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        log.info("converted %s to a universal checkpoint in %s", folder, out)
    dist.barrier()
    return out


def load(engine: Any, folder: Path, *, strict: bool, load_optimizer: bool = True,
         universal: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore DeepSpeed and RNG state from a complete step folder; returns (state, this rank's state).

    Same world size: this rank's files. `universal=True` (any world size): DeepSpeed's universal
    checkpoint, and `rank_state["data"]` becomes the list of every saved rank's data state, which the
    loader resumes exactly at the same world size or else handles by `data.resume_policy`.
    """
    from dydit_scale.train import safe_load

    state = read_marker(folder)
    saved, world = int(state["world_size"]), dist.world_size()
    if not universal:
        if saved != world:
            raise RecipeError([
                f"checkpoint.resume: {folder} was saved with world size {saved}, this run has {world}; "
                "resume with checkpoint.universal=true (and data.resume_policy=reshuffle)"
            ])
        safe_load.scan(folder)
        with safe_load.forced():
            path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=strict,
                                             load_optimizer_states=load_optimizer, load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"{folder}: DeepSpeed found no checkpoint files in it")
        rank_state = json.loads((folder / f"rank-{dist.rank()}.json").read_text())
        _set_rng_state(rank_state.pop("rng"))
        return state, rank_state
    if not engine.load_universal_checkpoint():
        raise ValueError("checkpoint.load(universal=True) needs an engine built with "
                         "\"checkpoint\": {\"load_universal\": true} (build_ds_config does it for checkpoint.universal)")
    safe_load.scan(folder)  # on every rank, so that all of them stop on a tampered file
    converted = to_universal(folder)
    safe_load.scan(converted, recursive=True)
    with safe_load.forced():
        path, _ = engine.load_checkpoint(str(folder), tag=converted.name, load_module_strict=strict,
                                         load_optimizer_states=load_optimizer, load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"{converted}: DeepSpeed found no universal checkpoint files in it")
    ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(saved)]
    if saved == world:
        _set_rng_state(ranks[dist.rank()]["rng"])
    rank_state = {k: v for k, v in ranks[dist.rank() if saved == world else 0].items() if k != "rng"}
    rank_state["data"] = [r["data"] for r in ranks]
    return state, rank_state
