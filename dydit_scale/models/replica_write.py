"""Write a replica (see `dydit_scale.models.replica`) as a diffusers pipeline folder, offline.

Components are built, saved and freed one at a time, so the peak memory is that of the largest
component rather than of the pipeline: a FLUX.1 transformer block alone is hundreds of MB. Weights
are split into as many safetensors shards as the released folder has, so loaders meet the same
index files. `model_index.json` comes from the stock pipeline class, built over the saved
components moved to the meta device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dydit_scale.models.loading import ModelFolderError
from dydit_scale.models.registry import get_replica
from dydit_scale.models.replica import TextEncoder
from dydit_scale.models.replica_tokenizers import clip_tokenizer, t5_tokenizer
from dydit_scale.models.tiny import _randomise_zero_inits

__all__ = ["DTYPES", "write_replica"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_replica(name: str, out: str | Path, *, layers: int | None = None, text_layers: int = 1,
                  dtype: str = "fp32", seed: int = 0) -> Path:
    """Write replica `name` with `layers` blocks per transformer stack (the replica's default when
    None) and `text_layers` per text encoder, random weights of `dtype` ("fp32" or "bf16"), to `out`."""
    import diffusers

    family, replica = get_replica(name)
    layers = replica.default_layers if layers is None else layers
    if layers < 1 or text_layers < 1:
        raise ValueError(f"write_replica: layers and text_layers must be >= 1, got {layers}, {text_layers}")
    if dtype not in DTYPES:
        raise ValueError(f"write_replica: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    _clear(out)
    torch_dtype = DTYPES[dtype]
    components: dict[str, Any] = {}

    def transformer() -> torch.nn.Module:
        model = family.transformer_class(**replica.transformer_config(layers))
        _randomise_zero_inits(model, seed)
        return model

    def write(component: str, build: Callable[[], torch.nn.Module], shards: int, offset: int) -> None:
        with _random_weights(torch_dtype, seed + offset):
            model = build()
        components[component] = _save(model, out / component, shards)

    write("transformer", transformer, replica.transformer_shards, 0)
    write("vae", lambda: diffusers.AutoencoderKL(**replica.vae), 1, 1)
    for offset, (component, encoder) in enumerate(replica.text_encoders.items(), start=2):
        write(component, functools.partial(_text_encoder, encoder, text_layers), encoder.shards, offset)
        tokenizer_name = component.replace("text_encoder", "tokenizer")
        components[tokenizer_name] = _tokenizer(encoder)
        components[tokenizer_name].save_pretrained(out / tokenizer_name)
    scheduler_class, scheduler_config = replica.scheduler
    components["scheduler"] = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    components["scheduler"].save_pretrained(out / "scheduler")
    family.pipeline_type()(**components).save_config(out)
    return out


def _clear(out: Path) -> None:
    """Make `out` an empty folder; only a pipeline folder is replaced (its components first, so no
    shard of an earlier layout is left behind), never a folder of other files."""
    if out.exists() and not out.is_dir():
        raise ModelFolderError(f"{out}: is a file; choose an empty or new folder")
    if out.is_dir() and any(out.iterdir()):
        index = out / "model_index.json"
        try:
            components = json.loads(index.read_text()) if index.is_file() else None
        except json.JSONDecodeError:
            components = None
        if not isinstance(components, dict):
            raise ModelFolderError(f"{out}: exists and is not a pipeline folder; choose an empty or new folder")
        for name, entry in components.items():
            if isinstance(entry, list) and (out / name).is_dir():
                shutil.rmtree(out / name)
        index.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _text_encoder(encoder: TextEncoder, layers: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config

    if encoder.kind == "t5":
        return _t5_encoder(T5Config(**encoder.config | {"num_layers": layers}))
    return CLIPTextModel(CLIPTextConfig(**encoder.config | {"num_hidden_layers": layers}))


def _t5_encoder(config: Any) -> torch.nn.Module:
    """T5's own init draws its 130 M-entry XXL embedding four times and every matrix twice, seconds
    per write; random weights need one draw each: uniform with unit-variance projections."""
    from transformers import T5EncoderModel
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = T5EncoderModel(config)
    model.tie_weights()  # skipped with the init: the input embedding is the shared one
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:  # the 1-D parameters are RMSNorm scales, built as ones
                bound = math.sqrt(3 / param.shape[-1])
                param.uniform_(-bound, bound)
    return model


def _tokenizer(encoder: TextEncoder) -> Any:
    if encoder.kind == "t5":
        return t5_tokenizer(encoder.tokenizer["model_max_length"])
    return clip_tokenizer(encoder.tokenizer["model_max_length"], encoder.tokenizer["pad_token"])


@contextlib.contextmanager
def _random_weights(dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Modules built inside get random weights from `seed` (the caller's RNG state is kept), created as
    `dtype`: building bf16 directly, rather than casting an fp32 model, halves the time and peak memory."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def _save(model: torch.nn.Module, folder: Path, shards: int) -> torch.nn.Module:
    """Save `model` in `shards` safetensors files; returns it on the meta device (its memory freed)."""
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=_max_shard_size(model, shards))
    written = len(list(folder.glob("*.safetensors")))
    if written != shards:
        raise RuntimeError(f"{folder}: wrote {written} weight file(s), expected {shards}")
    return model.to("meta")


def _max_shard_size(model: torch.nn.Module, shards: int) -> int:
    """The smallest shard size (bytes) at which the savers' split makes at most `shards` files.

    diffusers and transformers both split with `split_torch_state_dict_into_shards`, greedily tensor
    by tensor, so `total / shards` usually makes one file more than asked; a bisection finds the size."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = model.state_dict()

    def count(size: int) -> int:
        return len(split_torch_state_dict_into_shards(state, max_shard_size=size).filename_to_tensors)

    low, high = 1, split_torch_state_dict_into_shards(state, max_shard_size=2**62).metadata["total_size"]
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if count(mid) <= shards else (mid + 1, high)
    if count(high) != shards:
        raise ValueError(f"write_replica: {type(model).__name__} cannot be split into {shards} shards "
                         f"({len(state)} tensors); write more layers")
    return high
