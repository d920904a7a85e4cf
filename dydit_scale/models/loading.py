"""Load the user's own diffusers model from a local folder; nothing is ever downloaded.

A folder is either a whole pipeline (`model_index.json` + a `transformer/` subfolder) or a bare
transformer folder (`config.json` with `_class_name`). Every problem is one line naming the path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

#: family -> (diffusers transformer class, diffusers pipeline class)
FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "flux": ("FluxTransformer2DModel", "FluxPipeline"),
    "pixart": ("PixArtTransformer2DModel", "PixArtAlphaPipeline"),
    "latte": ("LatteTransformer3DModel", "LattePipeline"),
}
_SUPPORTED = ", ".join(cls for cls, _ in FAMILY_CLASSES.values())


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


def detect_family(path: str | Path) -> str:
    """The family (`flux`, `pixart`, `latte`) of the transformer stored under `path`."""
    folder = transformer_folder(path)
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{folder / 'config.json'}: not valid JSON ({exc.msg})") from None
    for family, (cls, _) in FAMILY_CLASSES.items():
        if class_name == cls:
            return family
    raise ModelFolderError(f"{folder}: transformer class {class_name!r} is not supported; expected one of {_SUPPORTED}")


def load_transformer(path: str | Path, family: str | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load the diffusers transformer under `path` offline; check it is of `family` when given."""
    import diffusers

    found = detect_family(path)
    if family is not None and found != family:
        raise ModelFolderError(f"{path}: holds a {found} transformer, but model.family is {family!r}")
    cls = getattr(diffusers, FAMILY_CLASSES[found][0])
    folder = transformer_folder(path)
    with _named_load_errors(folder):
        return cls.from_pretrained(folder, dtype=dtype, local_files_only=True)


def load_pipeline(path: str | Path, transformer: torch.nn.Module | None = None, dtype: torch.dtype = torch.float32,
                  *, drop_transformer: bool = False):
    """Load a whole local diffusers pipeline, optionally with our own (dynamic) transformer, or
    without any transformer (`drop_transformer`, for encoding only)."""
    import diffusers

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelFolderError(f"{path}: not a diffusers pipeline folder; expected model_index.json")
    cls = getattr(diffusers, FAMILY_CLASSES[detect_family(path)][1])
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
