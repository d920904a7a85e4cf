"""Launch the real trainer in subprocesses (1 process, or the deepspeed launcher with N ranks).

Every launch has a hard timeout and its own port; failures show the tail of the output.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        out.pop(key, None)
    return out


def train(overrides: list[str], *, ranks: int = 1, timeout_s: int = 240, check: bool = True,
          popen: bool = False, recipe: Path = RECIPE):
    """Run `python -m dydit_scale.train RECIPE overrides` (tiny_cpu.yaml by default) on `ranks` ranks."""
    if ranks == 1:
        command = [sys.executable, "-m", "dydit_scale.train", str(recipe), *overrides]
    else:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
                   "dydit_scale.train", str(recipe), *overrides]
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    result = subprocess.run(["timeout", "-k", "10", str(timeout_s), *command], cwd=REPO, env=env(),
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed (rc {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_identical_shards(folder: Path, *, shards: int, per_shard: int, caption: str = "a red circle at the centre",
                           bad: dict[str, int] | None = None) -> None:
    """Shards whose samples are all the same picture and caption (so any split gives the same batch),
    plus `bad` planted samples per reason ({"decode_error": n, "missing_caption": n}), one per shard at its start."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    image = buffer.getvalue()
    sizes = {}
    bad = dict(bad or {})
    for shard in range(shards):
        name = f"shard-{shard:06d}.tar"
        count = 0
        with tarfile.open(folder / name, "w") as tar:
            def add(member: str, data: bytes) -> None:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            if bad.get("decode_error"):
                bad["decode_error"] -= 1
                add(f"{shard:03d}bad1.png", b"not a png")
                add(f"{shard:03d}bad1.txt", caption.encode())
                count += 1
            if bad.get("missing_caption"):
                bad["missing_caption"] -= 1
                add(f"{shard:03d}bad2.png", image)
                count += 1
            for index in range(per_shard):
                key = f"{shard:03d}{index:04d}"
                add(f"{key}.png", image)
                add(f"{key}.txt", caption.encode())
                count += 1
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
