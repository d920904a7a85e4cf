"""Load DeepSpeed checkpoint files without running pickled code.

- DeepSpeed 0.19 reads every checkpoint file with `torch.load(weights_only=False)`, so a planted
  `__reduce__` object in a shared checkpoint would run on resume, conversion, export or sampling.
- `scan` parses each `.pt` of a folder with `weights_only=True` (mmap: only the pickle is read) and
  turns a refused object into one line naming the file.
- `forced` makes DeepSpeed's own loads weights-only too (`TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides an
  explicit `weights_only=False`), so nothing runs even if a file changes after the scan.
- `allowed()` is exactly the non-tensor types found in real ZeRO-0/1/2/3 checkpoints (fp32/bf16,
  LoRA/TD-LoRA/full, offload, EMA) and in their universal conversion; everything else is refused.
- `python -m dydit_scale.train.safe_load ARGS` runs `deepspeed.checkpoint.ds_to_universal ARGS` under
  the same rules (the allow-list must be registered in that process; fork workers inherit it).
"""

from __future__ import annotations

import os
import pickle
import re
import runpy
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses both at once


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something a weights-only load refuses; the message names the file."""


def allowed() -> list[type]:
    """The DeepSpeed types its checkpoints really store (optimizer states files)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def register() -> None:
    """Add the allow-list to torch's weights-only unpickler (process-wide, idempotent)."""
    torch.serialization.add_safe_globals(allowed())


def _refused(err: Exception) -> str:
    """torch's multi-paragraph refusal as one phrase naming the offending global where it can."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    what = f" ({found.group(1).rstrip('.,`')})" if found else ""
    return (f"refused to load: it holds a pickled object{what} that is not a tensor or one of DeepSpeed's known "
            "checkpoint types (a tampered or foreign checkpoint?)")


def scan(folder: Path, *, recursive: bool = False) -> None:
    """Raise UnsafeCheckpointError for the first `.pt` under `folder` a weights-only load refuses."""
    register()
    for path in sorted(folder.rglob("*.pt") if recursive else folder.glob("*.pt")):
        try:
            torch.load(path, mmap=zipfile.is_zipfile(path), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"{path}: {_refused(err)}") from None
        except (RuntimeError, EOFError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UnsafeCheckpointError(f"{path}: cannot be read as a checkpoint file ({first})") from None


def safe_env() -> dict[str, str]:
    """This process's environment with weights-only loads forced, for a subprocess."""
    out = dict(os.environ)
    out.pop(_NO_FORCE_ENV, None)
    out[FORCE_ENV] = "1"
    return out


@contextmanager
def forced() -> Iterator[None]:
    """Every `torch.load` inside is weights-only under the allow-list, whatever its caller passes."""
    register()
    saved = {key: os.environ.get(key) for key in (FORCE_ENV, _NO_FORCE_ENV)}
    os.environ.pop(_NO_FORCE_ENV, None)
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> None:
    """`python -m dydit_scale.train.safe_load ARGS`: DeepSpeed's ds_to_universal ARGS, weights-only."""
    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    try:
        with forced():
            runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
    except pickle.UnpicklingError as err:
        sys.exit(f"ds_to_universal: a checkpoint file was {_refused(err)}")


if __name__ == "__main__":
    main()
