"""What `dydit-bench memory` measures on a replica: parameter counts at the released depth, and the
activations one training forward keeps for its backward, per block kind.

Parameters: the stock transformer at the released depth is counted on the meta device (no memory);
what the dynamic conversion and the adapters add per block (routers, LoRA / TD-LoRA) is counted on a
model with one block per stack at the real width and multiplied by the released depth.

Activations: that one-block-per-stack model runs a training forward (masked path, routers live) and
a backward. A `saved_tensors_hooks` pack hook adds up the storages autograd keeps (each once,
parameters left out) and charges them to the block running at the time, so the count is exact and
the same on any device. Under activation checkpointing (non-reentrant, as `enable_gradient_checkpointing`
runs it) a block keeps only its tensor inputs, and the backward recomputes one block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dydit_scale.bench.infer_models import cast, model_inputs, to_device
from dydit_scale.config import DynamicConfig, LoraConfig
from dydit_scale.models.build import apply_adapters, dynamic_blocks
from dydit_scale.models.convert import make_dynamic
from dydit_scale.models.family import Family, vae_scale_factor
from dydit_scale.models.replica import Replica

__all__ = ["BlockCount", "Measured", "frozen_components", "measure_replica", "released_parameters"]


@dataclass
class BlockCount:
    """One block kind: its released depth, its parameters and the activations one block keeps."""

    kind: str
    depth: int
    parameters: int
    trainable: int
    added: int
    """Parameters the dynamic conversion and the adapters add to the stock block."""
    activations: int = 0
    checkpointed: int = 0
    """Bytes the block keeps under activation checkpointing: its tensor inputs."""


@dataclass
class Measured:
    """Per block kind, plus what the rest of the model (embedders, final layer, shared inputs) keeps."""

    blocks: list[BlockCount]
    other_trainable: int
    other_activations: int
    other_checkpointed: int
    """Outside the blocks, plus the inputs every block receives (timestep embedding, RoPE), kept once."""
    largest_layer: int
    cuda_forward_peak: int | None = None
    """CUDA only: max_memory_allocated growth over the forward of the one-block-per-stack model."""

    def activations(self, checkpointing: bool) -> int:
        """Bytes kept at the released depth at the end of the forward; under checkpointing the peak: the
        kept inputs plus one block's recomputed activations."""
        if not checkpointing:
            return self.other_activations + sum(b.depth * b.activations for b in self.blocks)
        recompute = max(b.activations for b in self.blocks)
        return self.other_checkpointed + sum(b.depth * b.checkpointed for b in self.blocks) + recompute

    def measured_model(self) -> int:
        """Bytes the measured model (one block per stack) kept: what a CUDA peak can be checked against."""
        return self.other_activations + sum(b.activations for b in self.blocks)


def _own_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def released_parameters(family: Family, replica: Replica) -> tuple[nn.Module, int]:
    """The stock transformer at the released depth on the meta device, and its parameter count."""
    with torch.device("meta"):
        model = family.transformer_class(**replica.transformer_config())
    return model, sum(p.numel() for p in model.parameters())


def frozen_components(replica: Replica) -> dict[str, int]:
    """Parameters of the pipeline's frozen components at the released depth, by component name (the
    text encoders and `vae`), counted on the meta device: every rank holds a whole copy of each."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    counts = {}
    with torch.device("meta"):
        for name, encoder in replica.text_encoders.items():
            model = (T5EncoderModel(T5Config(**encoder.config)) if encoder.kind == "t5"
                     else CLIPTextModel(CLIPTextConfig(**encoder.config)))
            counts[name] = sum(p.numel() for p in model.parameters())
        counts["vae"] = sum(p.numel() for p in diffusers.AutoencoderKL(**replica.vae).parameters())
    return counts


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _SavedBytes:
    """Storages autograd saves during a forward, charged to the block running at the time."""

    def __init__(self, model: nn.Module, blocks: dict[str, nn.Module]):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.owner: dict[int, tuple[str | None, int]] = {}
        self.inputs: dict[str, dict[int, int]] = {name: {} for name in blocks}
        self.current: str | None = None
        self.handles = []
        for name, block in blocks.items():
            self.handles.append(block.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.current = name
            for tensor in _tensors((args, kwargs)):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.params:
                    self.inputs[name][storage.data_ptr()] = storage.nbytes()
        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.current = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params and key not in self.owner:
            self.owner[key] = (self.current, storage.nbytes())
        return tensor

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _timestep(family: Family, batch: int, device: torch.device) -> torch.Tensor:
    """A mid-schedule timestep as the trainer feeds it (σ for flow matching, a DDPM index otherwise)."""
    if family.objective == "flow":
        return torch.full((batch,), 0.5, device=device)
    return torch.full((batch,), 500, device=device, dtype=torch.long)


def _block_counts(stock: nn.Module, blocks: dict[str, nn.Module]) -> dict[str, BlockCount]:
    """Each measured block's kind, released depth (its stack's length in `stock`) and parameters."""
    counts = {}
    for name, block in blocks.items():
        stack = name.rpartition(".")[0]
        base = sum(p.numel() for p in stock.get_submodule(f"{stack}.0").parameters())
        params = sum(p.numel() for p in block.parameters())
        trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
        counts[name] = BlockCount(block.kind, len(stock.get_submodule(stack)), params, trainable, params - base)
    return counts


def _charge(saved: _SavedBytes, counts: dict[str, BlockCount]) -> tuple[int, int]:
    """Charge the saved storages to the blocks; returns what stays outside them without and with
    checkpointing. Inputs that several blocks receive are the model's, kept once."""
    uses: dict[int, int] = {}
    for storages in saved.inputs.values():
        for key in storages:
            uses[key] = uses.get(key, 0) + 1
    shared = {key: nbytes for storages in saved.inputs.values() for key, nbytes in storages.items() if uses[key] > 1}
    outside = 0
    for key, (owner, nbytes) in saved.owner.items():
        if owner is None and key not in shared:
            outside += nbytes
        elif key not in shared:
            counts[owner].activations += nbytes
    for name, storages in saved.inputs.items():
        counts[name].checkpointed = sum(nbytes for key, nbytes in storages.items() if key not in shared)
    shared_saved = sum(nbytes for key, nbytes in shared.items() if key in saved.owner)
    return outside + shared_saved, outside + sum(shared.values())


def measure_replica(family: Family, replica: Replica, *, lora: LoraConfig, resolution: int, text_tokens: int,
                    batch: int, dtype: torch.dtype, device: torch.device) -> Measured:
    """Parameters per block kind and the activations of one training forward + backward (see module doc)."""
    stock, _ = released_parameters(family, replica)
    torch.manual_seed(0)
    model = make_dynamic(cast(family.transformer_class(**replica.transformer_config(1)), device, dtype),
                         DynamicConfig()).train()
    apply_adapters(model, lora)
    blocks = {name: model.get_submodule(name) for name in dynamic_blocks(model)}
    counts = _block_counts(stock, blocks)
    in_blocks = {id(p) for block in blocks.values() for p in block.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_blocks]
    largest = max(_own_parameters(m) for m in [*stock.modules(), *model.modules()])

    latent = resolution // vae_scale_factor(replica.vae)
    inputs = model_inputs(family.name, model.config, batch=batch, text_tokens=text_tokens, latent_hw=(latent, latent),
                          seed=0)
    inputs = to_device(inputs, device, dtype) | dict(timestep=_timestep(family, batch, device), return_dict=False)
    saved = _SavedBytes(model, blocks)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if cuda else 0
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            out = model(**inputs)[0]
    finally:
        saved.close()
    peak = torch.cuda.max_memory_allocated() - start if cuda else None
    out.float().square().mean().backward()
    other, other_checkpointed = _charge(saved, counts)
    return Measured(blocks=list(counts.values()), other_trainable=sum(p.numel() for p in rest if p.requires_grad),
                    other_activations=other,
                    other_checkpointed=other_checkpointed, largest_layer=largest, cuda_forward_peak=peak)
