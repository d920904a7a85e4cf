"""DyPixArt-α: the PixArt-α transformer with dynamic blocks (method spec §10)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.importance import PermutedSpan
from dydit_scale.models.adaln_block import DyAdaLNTransformerBlock, check_adaln_block, permute_adaln_block
from dydit_scale.models.dynamic_model import DynamicTransformerMixin

__all__ = ["DyPixArtTransformer2DModel", "adaln_timestep_embedding", "convert_pixart"]


def adaln_timestep_embedding(model: torch.nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """e_t = adaln_single.emb.timestep_embedder(time_proj(t)), without resolution/aspect embeddings (P11).

    Mirrors the timestep branch of diffusers 0.42.1 `PixArtAlphaCombinedTimestepSizeEmbeddings.forward`.
    """
    emb = model.adaln_single.emb
    dtype = model.proj_out.weight.dtype
    e_t = emb.timestep_embedder(emb.time_proj(timestep.reshape(-1)).to(dtype))
    return e_t.expand(batch, -1) if e_t.shape[0] == 1 else e_t


class DyPixArtTransformer2DModel(DynamicTransformerMixin, PixArtTransformer2DModel):
    """A `PixArtTransformer2DModel` whose blocks are dynamic (made by `make_dynamic`)."""

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return adaln_timestep_embedding(self, timestep, batch)


def convert_pixart(model: PixArtTransformer2DModel, config: DynamicConfig) -> DyPixArtTransformer2DModel:
    """Permute, then swap every block for a `DyAdaLNTransformerBlock`, in place."""
    blocks = model.transformer_blocks
    for index, block in enumerate(blocks):
        check_adaln_block(block, config, f"transformer_blocks.{index}")
    perms: dict[str, torch.Tensor] = {}
    spans: list[PermutedSpan] = []
    for index, block in enumerate(blocks):
        where = f"transformer_blocks.{index}"
        block_perms, block_spans = permute_adaln_block(block, config, where)
        perms.update(block_perms)
        spans += block_spans
        blocks[index] = DyAdaLNTransformerBlock(block, config, "pixart", where)
    model.__class__ = DyPixArtTransformer2DModel
    model.dydit_config, model.dydit_permutations, model.dydit_spans = config, perms, spans
    return model
