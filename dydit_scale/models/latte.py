"""DyLatte: the Latte video transformer with dynamic spatial and temporal blocks (method spec §11).

Both block kinds get their own head and group routers on e_t; the token router of each block
covers all F·S tokens of a clip (rows are frames in spatial blocks, positions in temporal blocks).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.latte_transformer_3d import LatteTransformer3DModel

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.importance import PermutedSpan
from dydit_scale.models.adaln_block import DyAdaLNTransformerBlock, check_adaln_block, permute_adaln_block
from dydit_scale.models.dynamic_model import DynamicTransformerMixin
from dydit_scale.models.pixart import adaln_timestep_embedding

__all__ = ["DyLatteTransformer3DModel", "convert_latte"]

_STACKS = (("transformer_blocks", "latte_spatial"), ("temporal_transformer_blocks", "latte_temporal"))


class DyLatteTransformer3DModel(DynamicTransformerMixin, LatteTransformer3DModel):
    """A `LatteTransformer3DModel` whose spatial and temporal blocks are dynamic (made by `make_dynamic`)."""

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return adaln_timestep_embedding(self, timestep, batch)


def convert_latte(model: LatteTransformer3DModel, config: DynamicConfig) -> DyLatteTransformer3DModel:
    """Permute, then swap every spatial and temporal block for a `DyAdaLNTransformerBlock`, in place."""
    for attr, _ in _STACKS:
        for index, block in enumerate(getattr(model, attr)):
            check_adaln_block(block, config, f"{attr}.{index}")
    perms: dict[str, torch.Tensor] = {}
    spans: list[PermutedSpan] = []
    for attr, kind in _STACKS:
        blocks = getattr(model, attr)
        for index, block in enumerate(blocks):
            where = f"{attr}.{index}"
            block_perms, block_spans = permute_adaln_block(block, config, where)
            perms.update(block_perms)
            spans += block_spans
            blocks[index] = DyAdaLNTransformerBlock(block, config, kind, where)
    model.__class__ = DyLatteTransformer3DModel
    model.dydit_config, model.dydit_permutations, model.dydit_spans = config, perms, spans
    return model
