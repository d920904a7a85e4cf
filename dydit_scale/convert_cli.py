"""`dydit-convert`: checkpoints of the original DiT / DyDiT code → folders our tools read.

* `official-dydit CKPT OUT`: a released DyDiT checkpoint becomes a run folder that `dydit-export`,
  `dydit-sample` and `load_run` accept like a trained run: the transformer as a diffusers folder
  (`OUT/model`), `OUT/recipe.yaml` (family dit, full fine-tuning, no re-ranking of heads and groups)
  and one step folder holding only the routers.
* `official-dit CKPT OUT`: a static DiT checkpoint becomes a diffusers folder to fine-tune from.

With `--vae DIR` the model folder is a whole `DiTPipeline` (sampling needs one), else a transformer folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from dydit_scale.help_format import DefaultsHelpFormatter

__all__ = ["convert_dit", "convert_dydit", "main"]

#: class indices the DiT paper samples (sample.py), used as the run's validation prompts
_DIT_CLASSES = ["207", "360", "387", "974", "88", "979", "417", "279"]
_STEP = "step-0000000"
_RECIPE_HEADER = """\
# Written by dydit-convert official-dydit from {source} ({entry} weights).
# model.path is the converted transformer; the step folder holds the DyDiT routers only.
# Export and sample it:  dydit-export {run} --steps 50 {run}/schedule
#                        dydit-sample {run} --schedule {run}/schedule {run}/samples
# data.shards is a placeholder: set it to class-labelled shards before training from this recipe.
"""


def _fresh(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists; give a new or empty output folder")


def _describe(arch) -> str:
    return (f"{arch.depth} blocks, width {arch.width}, {arch.heads} heads, patch {arch.patch}, "
            f"{arch.input_size}² latents, {arch.num_classes} classes")


def convert_dit(checkpoint: str | Path, out: str | Path, *, vae: str | Path | None = None,
                heads: int | None = None) -> tuple[Path, str]:
    """A static DiT checkpoint → a diffusers DiT folder (a `DiTPipeline` with `vae`)."""
    from dydit_scale.models.official_dit import build_transformer, infer_arch, read_checkpoint, save_model_folder

    out = Path(out)
    _fresh(out)
    read = read_checkpoint(checkpoint)
    arch = infer_arch(read.state, checkpoint, dynamic=False, heads=heads)
    with _cleaned_on_error(out):
        save_model_folder(build_transformer(read.state, arch, checkpoint), out, vae)
    return out, _describe(arch)


def _recipe_text(out: Path, checkpoint: Path, entry: str, model_dir: Path, ratio: float, resolution: int) -> str:
    from dydit_scale.config import Recipe, dump_recipe

    recipe = Recipe.model_validate({
        "run": {"name": out.name, "output_dir": str(out.resolve().parent)},
        "model": {"family": "dit", "path": str(model_dir.resolve())},
        # the released checkpoints are ranked already: head 0 and group 0 are their always-on units
        "dynamic": {"target_flops_ratio": ratio, "heads": True, "tokens": True, "mlp_groups": None,
                    "importance_norm": "none"},
        "lora": {"kind": "none"},
        "data": {"kind": "image_text", "shards": "SET-ME/class-labelled-shards", "resolution": resolution},
        "checkpoint": {"resume": "never"},
        "validation": {"prompts": _DIT_CLASSES, "seeds": [0], "guidance_scale": 4.0, "inference_steps": 50},
    })
    header = _RECIPE_HEADER.format(source=checkpoint.resolve(), entry=entry, run=out)
    return header + dump_recipe(recipe)


def convert_dydit(checkpoint: str | Path, out: str | Path, *, vae: str | Path | None = None,
                  heads: int | None = None, target_flops_ratio: float | None = None) -> tuple[Path, str, float | None]:
    """A DyDiT checkpoint → a run folder (`OUT/model`, `OUT/recipe.yaml`, a routers-only step folder).

    Returns the folder, the architecture in words and the λ recorded (the flag, else the checkpoint's
    own training argument, else None: 1.0 is recorded then)."""
    from dydit_scale.infer.runs import MARKER, ROUTERS_FILE, ROUTERS_ONLY, WEIGHTS_FIELD
    from dydit_scale.io import atomic_write_json, atomic_write_text, save_tensors
    from dydit_scale.models.family import vae_scale_factor
    from dydit_scale.models.official_dit import (build_transformer, infer_arch, read_checkpoint,
                                                 router_state_dict, save_model_folder)

    checkpoint, out = Path(checkpoint), Path(out)
    _fresh(out)
    read = read_checkpoint(checkpoint)
    arch = infer_arch(read.state, checkpoint, dynamic=True, heads=heads)
    ratio = target_flops_ratio if target_flops_ratio is not None else read.token_ratio
    with _cleaned_on_error(out):
        model_dir = save_model_folder(build_transformer(read.state, arch, checkpoint), out / "model", vae)
        vae_config = model_dir / "vae" / "config.json"
        scale = vae_scale_factor(json.loads(vae_config.read_text()) if vae_config.is_file() else None)
        atomic_write_text(out / "recipe.yaml", _recipe_text(out, checkpoint, read.entry, model_dir,
                                                            1.0 if ratio is None else ratio, arch.input_size * scale))
        step = out / "checkpoints" / _STEP
        save_tensors(step / ROUTERS_FILE, router_state_dict(read.state, arch))
        atomic_write_json(step / MARKER, {"step": 0, WEIGHTS_FIELD: ROUTERS_ONLY, "target_flops_ratio": ratio,
                                          "source": {"checkpoint": str(checkpoint.resolve()), "entry": read.entry,
                                                     "format": "official-dydit"}})
    return out, _describe(arch), ratio


@contextlib.contextmanager
def _cleaned_on_error(out: Path) -> Iterator[None]:
    """Remove a half-written output folder (it was empty or absent before)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dydit-convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("official-dydit", "a DyDiT checkpoint (alibaba-damo-academy/DyDiT) → a run folder"),
                           ("official-dit", "a static DiT checkpoint (facebookresearch/DiT) → a diffusers folder")):
        command = sub.add_parser(name, help=helptext, description=helptext, formatter_class=DefaultsHelpFormatter)
        command.add_argument("checkpoint", help="the .pt file (a state dict, or a dict with 'ema' / 'model')")
        command.add_argument("out", help="output folder (new or empty)")
        command.add_argument("--vae", help="a local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema): write a "
                                           "whole DiTPipeline, which sampling needs")
        command.add_argument("--heads", type=int, help="attention heads (default: from the routers, or the "
                                                       "DiT-S/B/L/XL count for the width)")
        if name == "official-dydit":
            command.add_argument("--target-flops-ratio", type=float, help="the λ the checkpoint was trained "
                                 "for (default: its recorded training argument, if any)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`dydit-convert {official-dydit,official-dit} CKPT OUT [--vae DIR]`."""
    args = _parser().parse_args(argv)
    from dydit_scale.console import quiet_third_party

    quiet_third_party(verbose=False)
    try:
        if args.command == "official-dit":
            out, arch = convert_dit(args.checkpoint, args.out, vae=args.vae, heads=args.heads)
            print(f"{out}: DiTTransformer2DModel ({arch})" + (" in a DiTPipeline" if args.vae else "")
                  + "; fine-tune from it with model.path")
            return 0
        out, arch, ratio = convert_dydit(args.checkpoint, args.out, vae=args.vae, heads=args.heads,
                                   target_flops_ratio=args.target_flops_ratio)
    except (ValueError, FileNotFoundError) as err:
        print(f"dydit-convert: {err}", file=sys.stderr)
        return 2
    print(f"{out}: DyDiT run ({arch}); next: dydit-export {out} --steps 50 {out}/schedule")
    if ratio is None:
        print("dydit-convert: note: the checkpoint records no FLOPs target; recipe.yaml says λ = 1.0 (pass "
              "--target-flops-ratio, e.g. 0.7 for new_dydit0.7.pt, for dydit-export's ratio check)", file=sys.stderr)
    if not args.vae:
        print("dydit-convert: note: no --vae: OUT/model is a transformer folder; dydit-export works, dydit-sample "
              "needs a DiTPipeline (rerun with --vae DIR)", file=sys.stderr)
    return 0
