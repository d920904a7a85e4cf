"""`dydit-bench gpu-check`: fast-path parity, inference speed and a FLUX.1-dev training step on one CUDA GPU.

One command for a first session on a GPU, within a time budget (default 7.5 min), each sub-step a
subprocess with its own hard timeout and log under --out:
1. the GPU parity tests (`tests/gpu`): fast vs masked path, attention sdpa and xformers;
2. `dydit-bench infer` in bf16 for flux-dev (at 1024²), pixart-alpha, latte-1 and dit-xl, with each attention
   backend;
3. one DeepSpeed TD-LoRA step of a random-weight FLUX.1-dev replica at 1024² (recipe
   flux_tdlora_zero2.yaml), reading loss, step time and peak memory from the run's metrics.jsonl.
A failed or timed-out sub-step is a failed row and the rest still run. --allow-cpu runs the same
steps at tiny sizes on CPU (--quick), which checks the plumbing on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from dydit_scale.bench import gpu_check_report as report
from dydit_scale.bench.gpu_check_steps import Step, run_steps, single_row

__all__ = ["add_arguments", "plan", "run"]

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ("sdpa", "xformers")
PRESETS = {"full": ("flux-dev", "pixart-alpha", "latte-1", "dit-xl"), "quick": ("tiny-flux", "tiny")}
CHECKS = ("parity", "infer", "train")
#: the one-step run: batch 1, no warm-up, a checkpoint at the step, one one-step validation image
ONE_STEP = ["train.steps=1", "train.grad_accum=1", "data.batch_size=1", "data.workers=0", "data.shuffle_buffer=0",
            "checkpoint.every_steps=1", "log.every_steps=1", "log.tensorboard=false", "optim.warmup_steps=0",
            "validation.every_steps=1000", "validation.inference_steps=1", "validation.prompts=[a red circle]",
            "validation.seeds=[0]", "model.attention=sdpa"]
QUICK_TRAIN = ["model.dtype=fp32", "data.max_text_tokens=16"]
IMAGES = 4
"""Training images: one step of batch 1 needs one."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"),
                        help="summary.json and the sub-steps' folders (logs, model, images, shards, train), "
                             "which every run rewrites")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run every step on CPU at tiny sizes (implies --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: a smoke test of the steps")
    parser.add_argument("--skip", action="append", choices=CHECKS, default=[], help="leave out a check (repeatable)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for all steps; a step that would start with less left is skipped")
    parser.add_argument("--layers", type=int, default=2, help="FLUX.1-dev replica: blocks per transformer stack")
    parser.add_argument("--write-images", type=Path, help=argparse.SUPPRESS)  # the training images' sub-step
    parser.add_argument("--image-side", type=int, default=1024, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.write_images:
        return write_images(args.write_images, args.image_side)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("dydit-bench gpu-check: torch sees no CUDA device; run it on a GPU machine, or pass --allow-cpu "
              "for a tiny CPU run of the same steps", file=sys.stderr)
        return 2
    if args.layers < 1 or args.budget <= 0:
        print(f"dydit-bench gpu-check: --layers and --budget must be positive, got {args.layers}, {args.budget}",
              file=sys.stderr)
        return 2
    device, quick = ("cuda" if cuda else "cpu"), args.quick or not cuda
    out = args.out.resolve()
    for owned in ("logs", "model", "images", "shards", "train"):
        shutil.rmtree(out / owned, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _stop)  # an outer `timeout` must not orphan a running step
    try:
        rows = run_steps(plan(out, device, quick, args.skip, args.layers), out / "logs", _env(out, device), REPO,
                         args.budget)
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = report.summary_json(rows, report.environment(device), mode="quick" if quick else "full",
                                  out=str(out), seconds=time.monotonic() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2) if args.json else report.render_table(summary))
    return 0 if summary["passed"] else 1


def _stop(signum: int, frame: object) -> None:
    """SIGTERM: unwind, which stops the running step's process group on the way out."""
    raise SystemExit(f"dydit-bench gpu-check: stopped by signal {signum}; the running step was stopped")


def _env(out: Path, device: str) -> dict[str, str]:
    """The sub-steps' environment: offline hub, the DeepSpeed accelerator, where the parity log goes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR=device, PYTHONUNBUFFERED="1",
               DYDIT_PARITY_LOG=str(out / "parity.jsonl"))
    if device == "cpu":
        env |= {"DYDIT_GPU_TESTS_ON_CPU": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    return env


def plan(out: Path, device: str, quick: bool, skip: list[str], layers: int) -> list[Step]:
    """Every sub-step, in order; those of the checks in `skip` are planned as skipped rows."""
    groups = {"parity": _parity(out, quick), "infer": _infer(out, device, quick), "train": _train(out, quick, layers)}
    for name in skip:
        for step in groups[name]:
            step.skip = "left out (--skip)"
    return [step for steps in groups.values() for step in steps]


def _parity(out: Path, quick: bool) -> list[Step]:
    junit, log = out / "parity.xml", out / "parity.jsonl"
    for path in (junit, log):
        path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "-W", "ignore::DeprecationWarning", f"--junitxml={junit}"]
    if quick:
        command += ["-k", "not released_width"]
    step = Step([f"parity {backend}" for backend in BACKENDS], command, 150.0,
                lambda outcome: report.parity_rows(outcome, junit, log, BACKENDS))
    if not (REPO / "tests" / "gpu").is_dir():
        step.skip = f"no tests/gpu under {REPO} (run from a clone)"
    return [step]


def _infer(out: Path, device: str, quick: bool) -> list[Step]:
    from dydit_scale.models.build import attention_problem

    steps = []
    extra = ["--steps", "1", "--repeats", "1", "--batch", "1"] if quick else []
    for preset in PRESETS["quick" if quick else "full"]:
        for backend in BACKENDS:
            result = out / f"infer-{preset}-{backend}.json"
            result.unlink(missing_ok=True)
            command = [sys.executable, "-m", "dydit_scale.bench", "infer", "--preset", preset, "--device", device,
                       "--dtype", "bf16", "--attention", backend, "--json", *extra]
            if preset == "flux-dev":
                command += ["--resolution", "1024"]
            check = f"infer {preset} {backend}"
            problem = attention_problem(backend) if backend == "xformers" else None
            steps.append(Step([check], command, 75.0, single_row(check, lambda path=result: report.infer_values(path)),
                              stdout=result, skip=problem and problem.removeprefix("model.attention: ").split(";")[0]))
    return steps


def _train(out: Path, quick: bool, layers: int) -> list[Step]:
    model, images, shards = out / "model", out / "images", out / "shards"
    data, resolution = [sys.executable, "-m", "data_tools.cli"], 32 if quick else 1024
    if quick:
        model_command, what = data + ["synth", "--tiny-model", "flux", str(model)], "tiny FLUX"
    else:
        model_command = data + ["synth", "--replica", "flux-dev", str(model), "--dtype", "bf16", "--layers",
                                str(layers), "--text-layers", "1"]
        what = f"FLUX.1-dev replica, {layers} block(s) per stack, 1 text layer, bf16"
    images_command = [sys.executable, "-m", "dydit_scale.bench", "gpu-check", "--write-images", str(images),
                      "--image-side", str(resolution)]
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    overrides = [f"model.path={model}", f"data.shards={shards}", f"run.output_dir={out}", "run.name=train",
                 f"data.resolution={resolution}", *ONE_STEP, *(QUICK_TRAIN if quick else [])]
    train = [deepspeed, "--num_gpus", "1", "--master_port", str(_free_port()), "--module", "dydit_scale.train",
             str(REPO / "recipes" / "flux_tdlora_zero2.yaml"), *overrides]
    return [
        Step(["train: model"], model_command, 120.0,
             single_row("train: model", lambda: _exists(model / "model_index.json", what))),
        Step(["train: images"], images_command, 60.0,
             single_row("train: images", lambda: _exists(images / "000000.png", f"{IMAGES} captioned PNGs, "
                                                                               f"{resolution}² px"))),
        Step(["train: shards"], data + ["pack", str(images), str(shards)], 60.0,
             single_row("train: shards", lambda: _exists(shards / "sizes.json", "dydit-data pack")),
             needs=("train: images",)),
        Step(["train: step"], train, 240.0,
             single_row("train: step", lambda: report.train_values(out / "train" / "metrics.jsonl")),
             needs=("train: model", "train: shards")),
    ]


def write_images(folder: Path, side: int) -> int:
    """Synthetic captioned PNGs at side² px, for `dydit-data pack`: the loader skips images whose shorter
    side is under half the training resolution, and `dydit-data synth --shards` draws at most 384 px."""
    from dydit_scale.data.synthetic import synthetic_image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(IMAGES):
        data, caption, _ = synthetic_image(index, size=(side, side), image_format="png")
        (folder / f"{index:06d}.png").write_bytes(data)
        (folder / f"{index:06d}.txt").write_text(caption + "\n")
    return 0


def _exists(path: Path, summary: str) -> tuple[dict[str, str], str]:
    if not path.is_file():
        raise ValueError(f"{path} was not written")
    return {"path": str(path.parent)}, summary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
