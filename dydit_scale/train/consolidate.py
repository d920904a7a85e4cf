"""Full fine-tuning weights of a step folder, consolidated from its DeepSpeed ZeRO files.

`load_run(path, consolidate=zero_state_dict)` loads full fine-tuning runs; the layers below train never
import DeepSpeed, so the commands above them (`dydit-export`, `dydit-sample`, `dydit-bench infer`) pass
this function down. DeepSpeed is imported only when it is called.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["zero_state_dict"]


def zero_state_dict(step_folder: Path) -> dict:
    """Full fine-tuning weights consolidated from the ZeRO files with DeepSpeed's own tool, weights-only
    (a tampered file is refused with an UnsafeCheckpointError, a ValueError naming it)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dydit_scale.train import safe_load

    step_folder = Path(step_folder)
    safe_load.scan(step_folder)
    with safe_load.forced():
        return get_fp32_state_dict_from_zero_checkpoint(str(step_folder.parent), tag=step_folder.name)
