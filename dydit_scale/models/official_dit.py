"""Read checkpoints of the original DiT / DyDiT code into diffusers' `DiTTransformer2DModel` layout.

The original code stores one module tree (`x_embedder`, `t_embedder`, `y_embedder`, `blocks.{i}` with a
fused qkv, `final_layer`); diffusers splits q/k/v and keeps a copy of the timestep + label embedder in
every block. DyDiT checkpoints add three routers per block, which map one-to-one onto ours: the
attention-head and MLP-group routers (C → H−1 logits, unit 0 always on) and the token router
(C → C/16 → 1). Files are read weights-only: nothing in them can run code.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from dydit_scale.models.dit import DIT_SCHEDULER, FAMILY, FREQ_SHIFT_KEY

__all__ = [
    "OfficialArch",
    "OfficialCheckpointError",
    "ReadCheckpoint",
    "build_transformer",
    "diffusers_state_dict",
    "infer_arch",
    "read_checkpoint",
    "router_state_dict",
    "save_model_folder",
]

#: DiT-S/B/L/XL widths -> heads (the DiT paper's table); other widths need `heads=` (`--heads`).
STANDARD_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
#: official router key (inside blocks.{i}.) -> ours (inside transformer_blocks.{i}.)
_ROUTER_KEYS = {
    "attn_rate.router": "head_router.proj",
    "mlp_rate.router": "mlp_router.proj",
    "token_selection.mlp_head.0": "token_router.fc1",
    "token_selection.mlp_head.2": "token_router.fc2",
}


class OfficialCheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the file."""


@dataclass(frozen=True)
class ReadCheckpoint:
    """The model tensors of a checkpoint file and what else it said about itself."""

    state: dict[str, torch.Tensor]
    entry: str
    """Which entry held the weights: ema | model | (the file itself) state_dict."""
    token_ratio: float | None
    """The FLOPs target the DyDiT training script recorded in its arguments, if any."""


@dataclass(frozen=True)
class OfficialArch:
    """A DiT architecture as the tensors of its checkpoint tell it."""

    depth: int
    width: int
    heads: int
    patch: int
    in_channels: int
    out_channels: int
    input_size: int
    num_classes: int
    dynamic: bool

    def transformer_config(self) -> dict[str, Any]:
        """Constructor arguments of the equivalent `DiTTransformer2DModel` (the original eps is 1e-6)."""
        return dict(num_attention_heads=self.heads, attention_head_dim=self.width // self.heads,
                    in_channels=self.in_channels, out_channels=self.out_channels, num_layers=self.depth,
                    sample_size=self.input_size, patch_size=self.patch, num_embeds_ada_norm=self.num_classes,
                    activation_fn="gelu-approximate", norm_type="ada_norm_zero", norm_elementwise_affine=False,
                    norm_eps=1e-6, attention_bias=True)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the original state dict with its shape."""
        c, p = self.width, self.patch
        shapes: dict[str, tuple[int, ...]] = {
            "x_embedder.proj.weight": (c, self.in_channels, p, p), "x_embedder.proj.bias": (c,),
            "pos_embed": (1, (self.input_size // p) ** 2, c),
            "t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,),
            "t_embedder.mlp.2.weight": (c, c), "t_embedder.mlp.2.bias": (c,),
            "y_embedder.embedding_table.weight": (self.num_classes + 1, c),
            "final_layer.adaLN_modulation.1.weight": (2 * c, c), "final_layer.adaLN_modulation.1.bias": (2 * c,),
            "final_layer.linear.weight": (p * p * self.out_channels, c),
            "final_layer.linear.bias": (p * p * self.out_channels,),
        }
        block = {"attn.qkv": (3 * c, c), "attn.proj": (c, c), "mlp.fc1": (4 * c, c), "mlp.fc2": (c, 4 * c),
                 "adaLN_modulation.1": (6 * c, c)}
        if self.dynamic:
            block |= {"attn_rate.router": (self.heads - 1, c), "mlp_rate.router": (self.heads - 1, c),
                      "token_selection.mlp_head.0": (c // 16, c), "token_selection.mlp_head.2": (1, c // 16)}
        for i in range(self.depth):
            for name, (rows, cols) in block.items():
                shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
                shapes[f"blocks.{i}.{name}.bias"] = (rows,)
        return shapes


def _weights_only_error(path: Path, err: Exception) -> OfficialCheckpointError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f"it pickles {found.group(1)}" if found else "it holds pickled Python objects"
    return OfficialCheckpointError(f"{path}: not a weights-only checkpoint ({what}); only tensors, plain containers "
                                   "and training arguments are read, never a full unpickle")


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such file; expected a DiT / DyDiT checkpoint (.pt)")
    try:
        # argparse.Namespace: the original training scripts store their arguments beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _weights_only_error(path, err) from None
    except Exception as err:  # garbage bytes fail anywhere inside the unpickler (KeyError, EOFError, …)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise OfficialCheckpointError(f"{path}: not a torch checkpoint ({first.rstrip('. ')})") from None


def read_checkpoint(path: str | Path) -> ReadCheckpoint:
    """The model weights of an original DiT / DyDiT checkpoint: its `ema` entry, else its `model`
    entry (a training checkpoint), else the file itself (a released state dict)."""
    path = Path(path)
    loaded = _load_file(path)
    if not isinstance(loaded, dict):
        raise OfficialCheckpointError(f"{path}: expected a state dict (or a dict with 'ema' / 'model'), "
                                      f"got a {type(loaded).__name__}")
    entry = next((k for k in ("ema", "model") if isinstance(loaded.get(k), dict)), "state_dict")
    state = loaded if entry == "state_dict" else loaded[entry]
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not state or others:
        raise OfficialCheckpointError(f"{path}: expected a state dict of tensors in {entry!r}, got "
                                      + (f"non-tensor entries {others[:3]}" if others else "no tensors"))
    args = loaded.get("args") if entry != "state_dict" else None
    ratio = getattr(args, "token_ratio", None) if isinstance(args, argparse.Namespace) else None
    return ReadCheckpoint(state={k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          entry=entry, token_ratio=float(ratio) if isinstance(ratio, (int, float)) else None)


def _shape(state: dict[str, torch.Tensor], key: str, ndim: int, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise OfficialCheckpointError(f"{path}: missing {key}; expected a checkpoint of the original DiT / DyDiT code")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise OfficialCheckpointError(f"{path}: {key} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def _heads(state: dict[str, torch.Tensor], width: int, dynamic: bool, heads: int | None, path: Path) -> int:
    """Heads from the routers (H − 1 outputs), else the given or the standard DiT count for the width."""
    if not dynamic:
        found = heads or STANDARD_HEADS.get(width)
        if found is None:
            raise OfficialCheckpointError(f"{path}: width {width} is not a DiT-S/B/L/XL width "
                                          f"({', '.join(map(str, STANDARD_HEADS))}); pass --heads")
        return found
    outputs = _shape(state, "blocks.0.attn_rate.router.weight", 2, path)[0]
    old = (heads == outputs) if heads else (width % (outputs + 1) != 0 and width % outputs == 0)
    if old:
        raise OfficialCheckpointError(
            f"{path}: its routers have {outputs} outputs, one per head: an early (Dec 2024) DyDiT checkpoint; "
            "the released DyDiT checkpoints (2025) have H − 1 router outputs (head 0 always on); "
            "convert one of those")
    if heads is not None and heads != outputs + 1:
        raise OfficialCheckpointError(f"{path}: blocks.0.attn_rate.router has {outputs} outputs, "
                                      f"expected H − 1 = {heads - 1} for --heads {heads}")
    if width % (outputs + 1):
        raise OfficialCheckpointError(f"{path}: width {width} does not split into {outputs + 1} heads "
                                      f"(blocks.0.attn_rate.router has {outputs} outputs, expected H − 1)")
    return outputs + 1


def infer_arch(state: dict[str, torch.Tensor], path: str | Path, *, dynamic: bool,
               heads: int | None = None) -> OfficialArch:
    """The architecture the tensors describe; every tensor is then checked against it (one-line errors)."""
    path = Path(path)
    has_routers = any(".attn_rate." in key for key in state)
    if has_routers != dynamic:
        raise OfficialCheckpointError(
            f"{path}: " + ("holds DyDiT routers; convert it with official-dydit" if has_routers
                           else "holds no DyDiT routers (blocks.N.attn_rate.router); a static DiT checkpoint "
                                "converts with official-dit"))
    width, in_channels, patch, _ = _shape(state, "x_embedder.proj.weight", 4, path)
    tokens = _shape(state, "pos_embed", 3, path)[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise OfficialCheckpointError(f"{path}: pos_embed has {tokens} positions, expected a square grid")
    depth = len({int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))})
    out = _shape(state, "final_layer.linear.weight", 2, path)[0]
    if depth == 0 or out % (patch * patch):
        raise OfficialCheckpointError(f"{path}: " + ("no blocks.N tensors" if depth == 0 else
                                      f"final_layer.linear has {out} outputs, not a multiple of patch² = {patch * patch}"))
    arch = OfficialArch(depth=depth, width=width, heads=_heads(state, width, dynamic, heads, path), patch=patch,
                        in_channels=in_channels, out_channels=out // (patch * patch), input_size=grid * patch,
                        num_classes=_shape(state, "y_embedder.embedding_table.weight", 2, path)[0] - 1,
                        dynamic=dynamic)
    _check_tensors(state, arch, path)
    return arch


def _check_tensors(state: dict[str, torch.Tensor], arch: OfficialArch, path: Path) -> None:
    expected = arch.expected_shapes()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise OfficialCheckpointError(f"{path}: tensors do not fit a {arch.depth}-block DiT (missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise OfficialCheckpointError(f"{path}: {key} has shape {list(state[key].shape)}, expected {list(shape)} "
                                          f"for width {arch.width}, {arch.heads} heads, patch {arch.patch}")


def diffusers_state_dict(state: dict[str, torch.Tensor], arch: OfficialArch) -> dict[str, torch.Tensor]:
    """The transformer's weights under diffusers' names (routers and the fixed pos_embed left out)."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"]}
    for ours, theirs in (("proj_out_1", "final_layer.adaLN_modulation.1"), ("proj_out_2", "final_layer.linear")):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = state[f"{theirs}.{kind}"]
    for i in range(arch.depth):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            for name, tensor in zip(("to_q", "to_k", "to_v"), state[f"{src}.attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{dst}.attn1.{name}.{kind}"] = tensor.contiguous()
            pairs = (("attn1.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                     ("norm1.linear", "adaLN_modulation.1"),
                     ("norm1.emb.timestep_embedder.linear_1", None), ("norm1.emb.timestep_embedder.linear_2", None))
            for ours, theirs in pairs:
                theirs = theirs and f"{src}.{theirs}"
                # every diffusers block embeds timestep and label itself: each gets its own copy
                theirs = theirs or f"t_embedder.mlp.{0 if ours.endswith('_1') else 2}"
                out[f"{dst}.{ours}.{kind}"] = state[f"{theirs}.{kind}"].clone()
        out[f"{dst}.norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"].clone()
    return out


def router_state_dict(state: dict[str, torch.Tensor], arch: OfficialArch) -> dict[str, torch.Tensor]:
    """The DyDiT routers under the names of our dynamic DiT blocks."""
    out = {}
    for i in range(arch.depth):
        for theirs, ours in _ROUTER_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"transformer_blocks.{i}.{ours}.{kind}"] = state[f"blocks.{i}.{theirs}.{kind}"]
    return out


def build_transformer(state: dict[str, torch.Tensor], arch: OfficialArch, path: str | Path) -> DiTTransformer2DModel:
    """The equivalent diffusers transformer (fp32), with the original timestep features recorded in its
    config (`FREQ_SHIFT_KEY`) and applied; its fixed pos_embed must be the checkpoint's."""
    with init_empty_weights():  # parameters only: the fixed sin-cos buffer is computed for real
        model = DiTTransformer2DModel(**arch.transformer_config())
    model.load_state_dict(diffusers_state_dict(state, arch), strict=True, assign=True)
    table = model.pos_embed.pos_embed
    error = float((table - state["pos_embed"]).abs().max())
    if error > 1e-4:
        raise OfficialCheckpointError(f"{path}: pos_embed differs from the fixed 2-D sin-cos table by {error:.2g}; "
                                      "diffusers' DiT cannot hold a learned position embedding")
    model.register_to_config(**{FREQ_SHIFT_KEY: 0})
    return FAMILY.configure_loaded(model.eval())


def _vae_folder(vae: Path) -> Path:
    folder = vae / "vae" if (vae / "model_index.json").is_file() else vae
    config = folder / "config.json"
    if not config.is_file() or '"AutoencoderKL"' not in config.read_text():
        raise OfficialCheckpointError(f"{vae}: expected a local diffusers AutoencoderKL folder (config.json with "
                                      "_class_name AutoencoderKL), or a pipeline folder holding one in vae/")
    return folder


def save_model_folder(transformer: DiTTransformer2DModel, out: str | Path, vae: str | Path | None = None) -> Path:
    """Write `out` as a whole `DiTPipeline` folder (transformer, the VAE of `vae`, DDIM over the linear
    DDPM betas, model_index.json) when `vae` is given, else as a transformer folder."""
    out = Path(out)
    if vae is None:
        transformer.save_pretrained(out, safe_serialization=True)
        return out
    import diffusers

    folder = _vae_folder(Path(vae))
    autoencoder = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True)
    scheduler = diffusers.DDIMScheduler(**DIT_SCHEDULER)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=autoencoder, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
