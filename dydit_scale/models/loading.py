"""Load the user's own diffusers model from a local folder; nothing is ever downloaded.

A folder is either a whole pipeline (`model_index.json` + a `transformer/` subfolder) or a bare
transformer folder (`config.json` with `_class_name`). Every problem is one line naming the path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dydit_scale.models.registry import all_families, get_family

if TYPE_CHECKING:  # torch loads with the weights, so folder checks stay cheap
    import torch


class ModelFolderError(ValueError):
    """A model path that cannot be loaded; the message is one line naming the path."""


def transformer_folder(path: str | Path) -> Path:
    """The folder holding the transformer's `config.json`, for a pipeline or a transformer folder."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"{path}: no such folder; expected a local diffusers pipeline or transformer folder")
    if not path.is_dir():
        raise ModelFolderError(f"{path}: is a file; expected a local diffusers pipeline or transformer folder")
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise ModelFolderError(
            f"{path}: not a diffusers folder; expected model_index.json (a pipeline) "
            "or config.json with _class_name (a transformer)"
        )
    return path


def detect_family(path: str | Path, expected: str | None = None) -> str:
    """The registered family of the transformer stored under `path`; it must be `expected` when given.

    Matching the class name imports the family modules (and torch), so it runs only once the
    folder itself checks out."""
    folder = transformer_folder(path)
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{folder / 'config.json'}: not valid JSON ({exc.msg})") from None
    candidates = [family for family in all_families() if family.transformer_class.__name__ == class_name]
    if not candidates:
        supported = ", ".join(dict.fromkeys(family.transformer_class.__name__ for family in all_families()))
        raise ModelFolderError(f"{folder}: transformer class {class_name!r} is not supported; expected one of {supported}")
    found = candidates[0]
    if len(candidates) > 1:  # dit and sit share a transformer class: a pipeline folder's class decides
        index = Path(path) / "model_index.json"
        pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        by_pipeline = [family for family in candidates if family.pipeline_class == pipeline]
        names = [family.name for family in candidates]
        found = by_pipeline[0] if by_pipeline else get_family(expected) if expected in names else found
    if expected is not None and found.name != expected:
        raise ModelFolderError(f"{path}: holds a {found.name} {'pipeline' if len(candidates) > 1 else 'transformer'}, "
                               f"but model.family is {expected!r}")
    return found.name


def pipeline_folder(path: str | Path) -> Path:
    """`path` as a whole pipeline: model_index.json and a folder for each component it lists
    (the transformer is checked by `transformer_folder`)."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"{path}: not a diffusers pipeline folder; expected model_index.json")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{index}: not valid JSON ({exc.msg})") from None
    for name, entry in components.items():
        listed = isinstance(entry, list) and len(entry) == 2 and None not in entry
        if listed and name != "transformer" and not (path / name).is_dir():
            raise ModelFolderError(f"{path}: model_index.json lists {name}, but there is no {name}/ folder")
    return path


def load_transformer(path: str | Path, family: str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load the diffusers transformer under `path` offline (fp32 unless `dtype`); check it is of `family` when given."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    record = get_family(detect_family(path, expected=family))
    folder = transformer_folder(path)
    with _named_load_errors(folder):
        model = record.transformer_class.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return record.configure_loaded(model)


def load_pipeline(path: str | Path, transformer: torch.nn.Module | None = None,
                  dtype: torch.dtype | dict[str, torch.dtype] | None = None, *, drop_transformer: bool = False):
    """Load a whole local diffusers pipeline (fp32 unless `dtype`: one, or per component with a
    "default"), optionally with our own (dynamic) transformer, or without any transformer
    (`drop_transformer`, for encoding only)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype

    path = pipeline_folder(path)
    cls = get_family(detect_family(path)).pipeline_type()
    extra = {"transformer": transformer} if transformer is not None or drop_transformer else {}
    with _named_load_errors(path):
        return cls.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)


@contextlib.contextmanager
def _named_load_errors(folder: Path) -> Iterator[None]:
    """diffusers reports a truncated or foreign weight file as a multi-line OSError: make it one line."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as err:
        if isinstance(err, ModelFolderError):
            raise
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ModelFolderError(f"{folder}: cannot load the model ({first.rstrip('. ')}); is a weight file "
                               "truncated or from another model?") from None
