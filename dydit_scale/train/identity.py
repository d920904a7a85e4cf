"""What a run trains, recorded in every checkpoint's commit marker and compared on resume.

Routers, adapters and optimizer moments only make sense on the base weights, dynamic layout and
objective they were trained with; a resume that changes any of them would continue silently on
other weights or another target. Fields that may change between launches (steps, learning rate,
logging, checkpoint cadence, data paths under `data.resume_policy`) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from dydit_scale.config import Recipe, RecipeError
from dydit_scale.models.loading import transformer_folder

log = logging.getLogger(__name__)
KEY = "identity"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FULL_HASH_BYTES = 256 * 2**20  # larger weight files are sampled: reading 24 GB on every launch is too slow
_SAMPLES, _CHUNK = 256, 2**16


def _hash_file(digest: Any, path: Path) -> None:
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
            return
        for k in range(_SAMPLES):  # evenly spaced chunks, the first and the last included
            handle.seek(k * (size - _CHUNK) // (_SAMPLES - 1))
            digest.update(handle.read(_CHUNK))


def base_model_fingerprint(model_path: str | Path) -> str:
    """SHA-256 over the transformer's config (without diffusers' bookkeeping keys) and weight files.

    Files up to 256 MiB are hashed whole, larger ones at 256 evenly spaced 64 KiB chunks: any
    fine-tune or re-initialisation changes every chunk, a copy or a move of the folder none.
    """
    folder = transformer_folder(model_path)
    config = json.loads((folder / "config.json").read_text())
    digest = hashlib.sha256(json.dumps({k: v for k, v in config.items() if not k.startswith("_")},
                                       sort_keys=True).encode())
    for path in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        _hash_file(digest, path)
    return "sha256:" + digest.hexdigest()


def run_identity(recipe: Recipe, objective: str) -> dict[str, Any]:
    """The fields a resume must not change, as JSON-ready values."""
    return {
        "family": recipe.model.family,
        "base_model": base_model_fingerprint(recipe.model.path),
        "dynamic": recipe.dynamic.model_dump(mode="json"),
        "lora": recipe.lora.model_dump(mode="json"),
        "objective": {"kind": objective, "timestep_weighting": recipe.train.timestep_weighting},
    }


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def check_resume(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """Refuse, in one line listing every changed field, a resume that changes what the run trains."""
    if KEY not in saved:
        log.warning("%s records no model identity (written by an older version); resuming unchecked", folder)
        return
    before, now = _flatten(saved[KEY], ""), _flatten(current, "")
    changed = [f"{key} ({before.get(key)!r} -> {now.get(key)!r})" for key in sorted(before.keys() | now.keys())
               if before.get(key) != now.get(key)]
    if changed:
        names = ", ".join(changed).replace("base_model (", "base model weights (")
        raise RecipeError([f"checkpoint.resume: {folder} was trained with other settings; changed: {names}. "
                           "Restore them, or start a new run (another run.name)"])
