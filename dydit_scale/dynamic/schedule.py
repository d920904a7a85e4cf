"""Frozen router schedules: the TDW masks at the exact time keys a sampler passes.

A schedule is a pure function of (TDW router weights, time keys): for every timestep router (keyed
by its qualified name, e.g. `transformer_blocks.0.head_router`) a bool mask [T, U] over the T
sampler steps, unit 0 always on. Token routers stay live and are not part of it: their masks depend
on the image, not only on t.

Files (`RouterSchedule.save`):
* `schedule.safetensors` — `time_keys` [T] (the transformer's `timestep` argument, its own dtype),
  `masks.<router>` bool [T, U], the de-duplicated table `unique.<router>` bool [K, U] with
  `mask_ids.<router>` int64 [T] (step k uses `unique[mask_ids[k]]`), `flops_ratio` float64 [T] (TDW
  only, SDT at 100 %), `perm.<block>.<heads|mlp|…>` int64 (the magnitude permutations of the heads
  and channels, so files for other tools can be written back in the base model's order).
* `schedule.json` — format and version, family and model class, base-weights and checkpoint hashes,
  λ, threshold, τ, the time-key definition with the exact keys and the sampler that produced them,
  the token shape used for the FLOPs ratios, the per-block layer table, unique-mask counts.

Lookup is exact: a key not in the schedule is an error, never a nearest neighbour (an unknown key
means another sampler, step count or resolution than the one the schedule was exported for).
"""

from __future__ import annotations

import hashlib
import json
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dydit_scale.dynamic import flops
from dydit_scale.io import load_tensors

__all__ = [
    "FORMAT", "FORMAT_VERSION", "LayerEntry", "RouterSchedule", "TimeKeys", "TokenShape",
    "UnknownTimeKeyError", "schedule_flops_ratio", "tensors_hash",
]

FORMAT = "dydit_scale.router_schedule"
FORMAT_VERSION = 1
TENSORS_FILE = "schedule.safetensors"
JSON_FILE = "schedule.json"


class UnknownTimeKeyError(ValueError):
    """The transformer was called with a timestep the schedule was not exported for."""


@dataclass(frozen=True)
class TimeKeys:
    """The exact `timestep` values the pipeline passes to the transformer, one per step."""

    values: torch.Tensor
    """[T], in the dtype the pipeline passes (float σ for FLUX, int64 DDPM indices for PixArt/Latte)."""
    definition: str = "timestep"
    """What the scalar is, e.g. `flux_sigma` (the transformer embeds 1000·σ) or `ddpm_index`."""
    direction: str = "large = noise"
    sampler: dict[str, Any] = field(default_factory=dict)
    """The sampler that produced the keys: name, scheduler class and config, steps, resolution, μ."""


@dataclass(frozen=True)
class TokenShape:
    """Token counts the per-step FLOPs ratio is computed for (the ratio depends on N through N²)."""

    image_tokens: int
    """Image tokens N (Latte: tokens per frame S)."""
    text_tokens: int
    """Text / context tokens M."""
    frames: int = 1


@dataclass(frozen=True)
class LayerEntry:
    """One dynamic block of the layer table: what `flops.block_macs` needs of it, and its routers."""

    name: str
    kind: str
    """One of `flops.BLOCK_KINDS`: dit | pixart | latte_spatial | latte_temporal | flux_double | flux_single."""
    heads: int
    head_dim: int
    hidden: int
    """MLP width D; a channel group holds D / groups channels."""
    groups: int
    routers: dict[str, str]
    """Width-dynamic parts: role (heads, cross_heads, mlp, text_mlp) -> timestep router name."""
    cross_heads: int = 0
    """Cross-attention heads (0: the block has no cross-attention)."""
    context_width: int | None = None


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


@dataclass(eq=False)
class RouterSchedule:
    """Per-step TDW masks of every timestep router, with the facts needed to trust them."""

    time_keys: TimeKeys
    masks: dict[str, torch.Tensor]
    """Router qualified name -> bool [T, U]."""
    layers: list[LayerEntry]
    token_shape: TokenShape
    flops_ratio: torch.Tensor
    """float64 [T]: TDW-only FLOPs ratio of each step at `token_shape`."""
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)
    family: str = ""
    model_class: str = ""
    base_model_hash: str = ""
    """Hash of the transformer's own weights (permuted order; adapters and routers excluded)."""
    checkpoint_hash: str = ""
    """Hash of the dynamic checkpoint's routers and adapters."""
    target_flops_ratio: float | None = None
    tau: float | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = self.time_keys.values.shape[0]
        for name, mask in self.masks.items():
            if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != steps:
                raise ValueError(f"schedule: masks[{name}] must be bool [{steps}, U], got {mask.dtype} {list(mask.shape)}")
            if not bool(mask[:, 0].all()):
                raise ValueError(f"schedule: masks[{name}] has a step without unit 0 (it is always on: every "
                                 "block keeps one head and one group)")
        self._index: dict[float, int] = {}
        for step, key in enumerate(self.time_keys.values.double().tolist()):
            self._index.setdefault(key, step)

    @property
    def steps(self) -> int:
        return int(self.time_keys.values.shape[0])

    def unique_masks(self, router: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [K, U] bool of distinct masks in order of first use, ids int64 [T]) for one router."""
        seen: dict[tuple[bool, ...], int] = {}
        ids = [seen.setdefault(tuple(row), len(seen)) for row in self.masks[router].tolist()]
        table = torch.tensor(list(seen), dtype=torch.bool).reshape(len(seen), -1)
        return table, torch.tensor(ids, dtype=torch.int64)

    def for_keys(self, time_keys: TimeKeys, token_shape: TokenShape) -> RouterSchedule:
        """The same schedule restricted to `time_keys` (another step count or resolution whose keys it
        holds, e.g. DDIM at half the steps), with FLOPs ratios at `token_shape`; ValueError naming the
        keys it lacks."""
        values = time_keys.values.double().tolist()
        missing = [v for v in values if v not in self._index]
        if missing:
            raise ValueError(f"{len(missing)} of the {len(values)} time keys asked for are not in the schedule "
                             f"(e.g. {missing[0]!r})")
        steps = torch.tensor([self._index[v] for v in values], dtype=torch.int64)
        masks = {name: mask[steps] for name, mask in self.masks.items()}
        return dataclasses.replace(self, time_keys=time_keys, masks=masks, token_shape=token_shape,
                                   flops_ratio=schedule_flops_ratio(self.layers, masks, token_shape))

    def step_index(self, timestep: torch.Tensor | float) -> int:
        """The step whose key equals `timestep` exactly; every sample of a batch must share it."""
        values = torch.as_tensor(timestep).detach().reshape(-1)
        if values.numel() == 0:
            raise ValueError("schedule: empty timestep tensor")
        if values.numel() > 1 and not bool((values == values[0]).all()):
            raise ValueError(f"schedule: all samples of a batch must share one time key, got {values.tolist()}; "
                             "split the batch by timestep")
        key = float(values[0].double())
        step = self._index.get(key)
        if step is None:
            sampler = self.time_keys.sampler
            made = f" ({sampler['name']}, {sampler.get('steps')} steps)" if "name" in sampler else ""
            raise UnknownTimeKeyError(
                f"schedule: time key {key!r} ({values.dtype}) is not one of its {self.steps} keys{made}; "
                "export a schedule for this sampler, step count and resolution with dydit-export "
                "(unknown keys are never matched to a nearest neighbour)")
        return step

    # ------------------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        """Write `schedule.safetensors` and `schedule.json` into `folder`; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"time_keys": self.time_keys.values, "flops_ratio": self.flops_ratio.double()}
        for name, mask in self.masks.items():
            table, ids = self.unique_masks(name)
            tensors.update({f"masks.{name}": mask, f"unique.{name}": table, f"mask_ids.{name}": ids})
        tensors.update({f"perm.{key}": perm.to(torch.int64) for key, perm in self.permutations.items()})
        tensors = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}  # byte-stable header
        save_file(tensors, str(folder / TENSORS_FILE),
                  metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})  # one key: safetensors orders a map randomly
        text = json.dumps(self._header(), indent=2, sort_keys=True) + "\n"
        (folder / JSON_FILE).write_text(text)
        return folder

    def _header(self) -> dict[str, Any]:
        keys = self.time_keys
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": self.family,
            "model_class": self.model_class, "base_model_hash": self.base_model_hash,
            "checkpoint_hash": self.checkpoint_hash, "source": self.source,
            "weights_permuted": True, "target_flops_ratio": self.target_flops_ratio,
            "threshold": 0.5, "tau": self.tau,
            "time_key": {"definition": keys.definition, "direction": keys.direction,
                         "dtype": str(keys.values.dtype).removeprefix("torch."),
                         "values": keys.values.tolist(), "sampler": keys.sampler},
            "token_shape": asdict(self.token_shape),
            "layers": [asdict(layer) for layer in self.layers],
            "steps": self.steps,
            "unique_masks": {name: int(self.unique_masks(name)[0].shape[0]) for name in self.masks},
            "flops_ratio": self.flops_ratio.tolist(),
            "mean_flops_ratio": float(self.flops_ratio.mean()) if self.steps else None,
        }

    @classmethod
    def load(cls, folder: str | Path) -> RouterSchedule:
        """Read a schedule written by `save`, checking the format and the mask tables."""
        folder = Path(folder)
        header_path, tensors_path = folder / JSON_FILE, folder / TENSORS_FILE
        if not header_path.is_file() or not tensors_path.is_file():
            raise FileNotFoundError(f"{folder}: not a schedule folder; expected {JSON_FILE} and {TENSORS_FILE}")
        header = json.loads(header_path.read_text())
        if header.get("format") != FORMAT:
            raise ValueError(f"{header_path}: not a router schedule (format={header.get('format')!r})")
        version = header.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{header_path}: format_version {version!r} is not a version this code wrote; "
                             f"expected 1..{FORMAT_VERSION} (re-export with dydit-export)")
        if version > FORMAT_VERSION:
            raise ValueError(f"{header_path}: format_version {version} is newer than this code "
                             f"({FORMAT_VERSION}); update dydit_scale")
        tensors = load_tensors(tensors_path)
        masks = {k.removeprefix("masks."): v for k, v in tensors.items() if k.startswith("masks.")}
        for name, mask in masks.items():
            table, ids = tensors[f"unique.{name}"], tensors[f"mask_ids.{name}"]
            if not torch.equal(table[ids], mask):
                raise ValueError(f"{tensors_path}: unique-mask table of {name} disagrees with its per-step masks")
        time = header["time_key"]
        return cls(
            time_keys=TimeKeys(tensors["time_keys"], time["definition"], time["direction"], time["sampler"]),
            masks=masks, layers=[LayerEntry(**layer) for layer in header["layers"]],
            token_shape=TokenShape(**header["token_shape"]), flops_ratio=tensors["flops_ratio"],
            permutations={k.removeprefix("perm."): v for k, v in tensors.items() if k.startswith("perm.")},
            family=header["family"], model_class=header["model_class"],
            base_model_hash=header["base_model_hash"], checkpoint_hash=header["checkpoint_hash"],
            target_flops_ratio=header["target_flops_ratio"], tau=header["tau"], source=header["source"],
        )


def schedule_flops_ratio(layers: list[LayerEntry], masks: dict[str, torch.Tensor], shape: TokenShape) -> torch.Tensor:
    """TDW-only FLOPs ratio per step, float64 [T]: Σ dynamic MACs / Σ full MACs, every token routed
    (the token routers stay live, so the schedule cannot know what they skip)."""
    steps = next(iter(masks.values())).shape[0] if masks else 0
    dynamic, full = torch.zeros(steps, dtype=torch.float64), 0.0
    for layer in layers:
        size = dict(heads=layer.heads, head_dim=layer.head_dim, hidden=layer.hidden, cross_heads=layer.cross_heads,
                    context_width=layer.context_width, **asdict(shape))
        active = {role: flops.active_units(role, masks[router].double()) for role, router in layer.routers.items()}
        dynamic = dynamic + flops.block_macs(layer.kind, **size, active=active)
        full += float(flops.block_macs(layer.kind, **size))
    return dynamic / full if full > 0 else dynamic
