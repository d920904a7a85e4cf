"""TD-LoRA: timestep-gated mixtures of LoRA experts on frozen linears.

DyDiT++ (arXiv 2504.06803) introduces timestep-based dynamic LoRA (TD-LoRA) for parameter-efficient
DyDiT training; the exact form below is our own design. For each adapted frozen linear
W ∈ R^{out×in}, E experts (A_e ∈ R^{r×in}, B_e ∈ R^{out×r}) with r = rank/E are mixed by a
per-block gate π(t) = softmax(W_π·e_t + b_π) computed from the *pure* timestep embedding e_t (the
TDW routers' input, free of text and resolution conditioning, so the gate, like the TDW masks,
depends on t alone and can be merged per step):

    y = W·x + b + (α/r)·Σ_e π_e(t)·B_e·(A_e·x)

Decisions (documented for the adapter file and the dynamic blocks):
* **Scale α/r with r the per-expert rank** (the formula above). Since Σ_e π_e = 1, a uniform gate
  gives (α/r)/E·Σ_e B_e A_e = (α/rank)·B_cat·A_cat: exactly a plain rank-`rank` LoRA with the
  recipe's `alpha/rank` scale, so `lora.kind=lora` and `td_lora` start from the same update size.
* **Experts are stored concatenated:** `lora_A.weight` [E·r, in] (expert e owns rows e·r…e·r+r−1),
  `lora_B.weight` [out, E·r] (same columns) — two matmuls per layer, peft-like key names.
* **The base Linear keeps its keys:** `TDLoRALinear` *is* an `nn.Linear` that takes over the original
  `weight`/`bias` Parameters, so `…to_q.weight` stays loadable from base checkpoints and sliceable by
  the dynamic blocks (use `merged_weight(pi)` when slicing at inference: merge, then slice).
* **π travels per forward:** each block owns one `TimestepGate` (registered once, at
  `<block>.td_gate`); the dynamic model's forward hands e_t to every gate's `prepare_step` (through
  `dydit_scale.dynamic.routers.broadcast_timestep`), which computes π [B, E] through the gate's own
  module call (ZeRO-3 gathers its parameters) and every `TDLoRALinear` reads it through a plain,
  unregistered reference. π is computed outside the checkpointed blocks, so non-reentrant activation
  checkpointing recomputes the blocks with the same π and its gradient reaches W_π.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dydit_scale.io import read_safetensors, save_tensors

__all__ = [
    "TDLoRALinear",
    "TDLoRAFileInfo",
    "TimestepGate",
    "apply_td_lora",
    "load_td_lora",
    "load_td_lora_state_dict",
    "read_td_lora_file",
    "save_td_lora",
    "td_lora_state_dict",
    "match_linears",
    "td_lora_layers",
]

GATE_NAME = "td_gate"


class TimestepGate(nn.Module):
    """π(t) = softmax(W_π·e_t + b_π) over E LoRA experts, one per block.

    W_π = 0, b_π = 0 at init → uniform gate. `pi` holds this forward's [B, E] gate (fp32).
    """

    def __init__(self, cond_dim: int, experts: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, cond_dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(experts, dtype=dtype, device=device))
        self.pi: torch.Tensor | None = None

    def forward(self, e_t: torch.Tensor) -> torch.Tensor:
        """Gate probabilities [B, E] in fp32 for the pure timestep embedding e_t [B, C_t]."""
        logits = F.linear(e_t.to(self.weight.dtype), self.weight, self.bias)
        return torch.softmax(logits.float(), dim=-1)

    def set_timestep_embedding(self, e_t: torch.Tensor) -> torch.Tensor:
        """Compute and hold π for this forward; returns it."""
        if e_t.dim() != 2 or e_t.shape[1] != self.weight.shape[1]:
            raise ValueError(f"TD-LoRA gate: expected e_t of shape [B, {self.weight.shape[1]}], got {list(e_t.shape)}")
        self.pi = self(e_t)
        return self.pi

    def prepare_step(self, e_t: torch.Tensor) -> None:
        """Hook of `dydit_scale.dynamic.routers.broadcast_timestep`: a dynamic model's forward
        computes e_t once and hands it to every router and gate before its blocks run."""
        self.set_timestep_embedding(e_t)


class TDLoRALinear(nn.Linear):
    """A frozen `nn.Linear` plus E gated LoRA experts; the original Parameters are reused, not copied."""

    def __init__(self, base: nn.Linear, gate: TimestepGate, *, rank: int, alpha: float, experts: int,
                 target: str = ""):
        nn.Module.__init__(self)  # skip nn.Linear's allocation: we take over base's Parameters
        if rank % experts:
            raise ValueError(f"TD-LoRA: rank ({rank}) must be divisible by experts ({experts})")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.experts, self.target = rank, float(alpha), experts, target
        self.expert_rank = rank // experts
        self.scale = self.alpha / self.expert_rank
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default for A
        nn.init.zeros_(self.lora_B.weight)  # B = 0 → identical to the base layer at step 0
        object.__setattr__(self, "_gate", gate)  # a reference, not a submodule: keys stay unique

    @property
    def gate(self) -> TimestepGate:
        return self._gate

    def _pi_per_rank(self, pi: torch.Tensor) -> torch.Tensor:
        """[..., E] → [..., E·r]: each expert's weight repeated over its r rank rows."""
        return pi.repeat_interleave(self.expert_rank, dim=-1)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """The side path (α/r)·Σ_e π_e B_e A_e x, [..., out].

        Rows of x must be batch-major groups of the gate's B samples ([B, N, in], Latte's [B·F, S, in]
        and [B·S, F, in], or flattened [B·N, in]): π of sample b applies to its rows.
        """
        pi = self._gate.pi
        if pi is None:
            raise RuntimeError(
                "TD-LoRA: no timestep embedding set for this forward; the dynamic model's forward sets "
                "it (its gates' prepare_step(e_t), via dydit_scale.dynamic.routers.broadcast_timestep); "
                "for a plain transformer call broadcast_timestep(model, e_t) before its forward"
            )
        h = self.lora_A(x)
        rows = h.numel() // h.shape[-1]
        if rows % pi.shape[0]:
            raise RuntimeError(f"TD-LoRA: {rows} input rows do not split into the gate's {pi.shape[0]} samples")
        gated = h.reshape(pi.shape[0], -1, h.shape[-1]) * self._pi_per_rank(pi).to(h.dtype)[:, None, :]
        return self.lora_B(gated.reshape(h.shape)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_output(x)

    def delta_weight(self, pi: torch.Tensor) -> torch.Tensor:
        """ΔW(t) = (α/r)·Σ_e π_e B_e A_e for a gate π [E] → [out, in] (or [B, E] → [B, out, in])."""
        b_gated = self.lora_B.weight * self._pi_per_rank(pi.to(self.lora_B.weight.dtype)).unsqueeze(-2)
        return (b_gated @ self.lora_A.weight) * self.scale

    def merged_weight(self, pi: torch.Tensor) -> torch.Tensor:
        """W + ΔW(t): the per-step merged weight to slice for the active heads/groups."""
        return self.weight + self.delta_weight(pi).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, experts={self.experts}, alpha={self.alpha:g}"


def match_linears(model: nn.Module, targets: Sequence[str],
                  block_prefixes: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(module name, matched target) for every `nn.Linear` matching a target suffix (peft's rule).

    A target t matches a name n when n == t or n ends with "." + t; with `block_prefixes`, only names
    inside one of those blocks count. Raises ValueError naming the targets that matched nothing.
    """
    prefixes = tuple(p.rstrip(".") + "." for p in block_prefixes) if block_prefixes is not None else None
    found: list[tuple[str, str]] = []
    unmatched = set(targets)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (prefixes is not None and not name.startswith(prefixes)):
            continue
        if any(part in ("lora_A", "lora_B", "base_layer") for part in name.split(".")):
            continue  # adapter internals of an already-adapted layer
        for target in targets:
            if name == target or name.endswith("." + target):
                found.append((name, target))
                unmatched.discard(target)
                break
    if unmatched:
        where = f" inside blocks {list(block_prefixes)}" if block_prefixes is not None else ""
        raise ValueError(
            f"lora.targets: {sorted(unmatched)} matched no nn.Linear{where}; "
            "use module-name suffixes such as 'to_q' or 'ff.net.2'"
        )
    return found


def apply_td_lora(model: nn.Module, *, targets: Sequence[str], rank: int, alpha: float, experts: int,
                  cond_dim: int, block_prefixes: Sequence[str]) -> list[str]:
    """Wrap every target `nn.Linear` inside `block_prefixes` in a `TDLoRALinear`; returns wrapped names.

    One `TimestepGate` per block, registered as `<block>.td_gate`. Like peft's injection, afterwards
    only the adapter parameters (lora_A, lora_B, td_gate) require grad; the caller re-enables routers.
    Run it after the blocks are made dynamic (a block replaced later would lose its gate).
    """
    if rank % experts:
        raise ValueError(f"lora.rank ({rank}) must be divisible by lora.groups ({experts}) for td_lora")
    if td_lora_layers(model):
        raise ValueError("apply_td_lora: the model already has TD-LoRA layers")
    missing = [p for p in block_prefixes if _get_submodule(model, p) is None]
    if missing:
        raise ValueError(f"apply_td_lora: block prefixes {missing} name no submodule of the model")
    matches = match_linears(model, targets, block_prefixes)
    model.requires_grad_(False)
    ref = next(model.parameters())
    gates: dict[str, TimestepGate] = {}
    for prefix in block_prefixes:
        gates[prefix] = TimestepGate(cond_dim, experts, dtype=ref.dtype, device=ref.device)
        _get_submodule(model, prefix).register_module(GATE_NAME, gates[prefix])
    wrapped = []
    for name, target in matches:
        prefix = max((p for p in block_prefixes if name.startswith(p.rstrip(".") + ".")), key=len)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        setattr(parent, child, TDLoRALinear(base, gates[prefix], rank=rank, alpha=alpha, experts=experts,
                                            target=target))
        wrapped.append(name)
    return wrapped


def _get_submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name.rstrip("."))
    except AttributeError:
        return None


def td_lora_layers(model: nn.Module) -> dict[str, TDLoRALinear]:
    """Every TD-LoRA layer by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TDLoRALinear)}


# --------------------------------------------------------------------------- (de)serialisation

FORMAT = "dydit_scale.td_lora"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TDLoRAFileInfo:
    """The header of a TD-LoRA adapter file: everything `apply_td_lora` needs to rebuild the layers."""

    rank: int
    alpha: float
    experts: int
    cond_dim: int
    targets: tuple[str, ...]
    blocks: tuple[str, ...]
    modules: tuple[str, ...]


def td_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only (lora_A, lora_B of every layer, td_gate of every block), model-relative keys.

    Keys: `<layer>.lora_A.weight` [E·r, in], `<layer>.lora_B.weight` [out, E·r],
    `<block>.td_gate.weight` [E, C_t], `<block>.td_gate.bias` [E]. Under ZeRO-3 gather first.
    """
    keep = {f"{n}.{leaf}.weight" for n in td_lora_layers(model) for leaf in ("lora_A", "lora_B")}
    keep |= {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, TimestepGate) for p in ("weight", "bias")}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def load_td_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an adapted model; the key sets and shapes must match exactly."""
    own = td_lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"TD-LoRA state dict does not fit the model: missing {missing[:3]}"
                         f"{'…' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'…' if len(unexpected) > 3 else ''}")
    bad = [k for k in own if own[k].shape != state_dict[k].shape]
    if bad:
        raise ValueError(f"TD-LoRA state dict: shape mismatch for {bad[0]}: model "
                         f"{list(own[bad[0]].shape)}, file {list(state_dict[bad[0]].shape)}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state_dict[key])


def _file_info(model: nn.Module) -> TDLoRAFileInfo:
    layers = td_lora_layers(model)
    if not layers:
        raise ValueError("save_td_lora: the model has no TD-LoRA layers")
    configs = {(m.rank, m.alpha, m.experts) for m in layers.values()}
    if len(configs) != 1:
        raise ValueError(f"save_td_lora: layers disagree on (rank, alpha, experts): {sorted(configs)}")
    (rank, alpha, experts), = configs
    gates = {n: m for n, m in model.named_modules() if isinstance(m, TimestepGate)}
    blocks = tuple(n.rpartition(".")[0] for n in gates)
    return TDLoRAFileInfo(rank=rank, alpha=alpha, experts=experts,
                          cond_dim=next(iter(gates.values())).weight.shape[1],
                          targets=tuple(dict.fromkeys(m.target for m in layers.values())),
                          blocks=blocks, modules=tuple(layers))


def save_td_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter as one safetensors file (atomically, `dydit_scale.io.save_tensors`).

    Layout: tensors as in `td_lora_state_dict`, in the training dtype; header metadata (all strings):
    format="dydit_scale.td_lora", format_version="1", rank (total over experts), alpha, experts,
    cond_dim, and JSON lists targets (suffixes), blocks (gate prefixes), modules (adapted layers).
    """
    info, path = _file_info(model), Path(path)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "rank": str(info.rank),
                "alpha": repr(info.alpha), "experts": str(info.experts), "cond_dim": str(info.cond_dim),
                "targets": json.dumps(list(info.targets)), "blocks": json.dumps(list(info.blocks)),
                "modules": json.dumps(list(info.modules))}
    save_tensors(path, td_lora_state_dict(model), metadata=metadata)
    return path


def read_td_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TDLoRAFileInfo]:
    """Tensors and header of an adapter file written by `save_td_lora`."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a TD-LoRA adapter file (header format={meta.get('format')!r})")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than "
                         f"this code ({FORMAT_VERSION}); update dydit_scale")
    info = TDLoRAFileInfo(rank=int(meta["rank"]), alpha=float(meta["alpha"]), experts=int(meta["experts"]),
                          cond_dim=int(meta["cond_dim"]), targets=tuple(json.loads(meta["targets"])),
                          blocks=tuple(json.loads(meta["blocks"])), modules=tuple(json.loads(meta["modules"])))
    return tensors, info


def load_td_lora(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter file; a model without TD-LoRA layers is adapted first from the header.

    An already-adapted model must have the same rank, alpha, experts and layers as the file.
    Returns the adapted module names.
    """
    tensors, info = read_td_lora_file(path)
    if not td_lora_layers(model):
        apply_td_lora(model, targets=info.targets, rank=info.rank, alpha=info.alpha, experts=info.experts,
                      cond_dim=info.cond_dim, block_prefixes=info.blocks)
    own = _file_info(model)
    ours, theirs = (own.rank, own.alpha, own.experts, sorted(own.modules)), (
        info.rank, info.alpha, info.experts, sorted(info.modules))
    if ours != theirs:
        raise ValueError(f"{path}: adapter (rank {info.rank}, alpha {info.alpha:g}, experts {info.experts}, "
                         f"{len(info.modules)} layers) does not match the model's (rank {own.rank}, alpha "
                         f"{own.alpha:g}, experts {own.experts}, {len(own.modules)} layers)")
    load_td_lora_state_dict(model, tensors)
    return list(own.modules)
