"""Released pipelines at their real widths: what a replica folder holds (`Replica`) and the released
component configs several families share (the T5-XXL and CLIP-L text encoders, the two VAEs).

A replica is the released pipeline's folder layout and component configs with random weights and
fewer blocks, so memory, speed and layout problems show at the sizes users train without a model hub.
Each family lists its replicas in its `Family.replicas`.

Numbers are those of the released `config.json` files; where each comes from is noted beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLIP_L", "FLUX_VAE", "SD_VAE", "T5_XXL", "Replica", "TextEncoder"]


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder + tokenizer pair of a pipeline folder."""

    kind: str
    """"t5" (T5EncoderModel + T5TokenizerFast) or "clip" (CLIPTextModel + CLIPTokenizer)."""
    config: dict[str, Any]
    """The released encoder config (its full depth; `--text-layers` cuts `num_layers`/`num_hidden_layers`)."""
    tokenizer: dict[str, Any]
    """Released tokenizer facts: `model_max_length`, and for CLIP its `pad_token`."""
    shards: int = 1
    """How many safetensors shards the released folder splits the weights into (1 = one file)."""


@dataclass(frozen=True)
class Replica:
    """A released pipeline: component configs at full width and depth, and its folder layout."""

    name: str
    source: str
    """The released folder this replicates (a hub id, for the record; nothing is downloaded)."""
    transformer: dict[str, Any]
    """The released transformer config at full depth."""
    depth_keys: tuple[str, ...]
    """Transformer config keys that count blocks; a replica sets each to `--layers`."""
    default_layers: int
    transformer_shards: int
    vae: dict[str, Any]
    scheduler: tuple[str, dict[str, Any]]
    """diffusers scheduler class name and its released config."""
    text_encoders: dict[str, TextEncoder] = field(default_factory=dict)
    """Pipeline component name (`text_encoder`, `text_encoder_2`) -> encoder; tokenizers sit beside them."""

    def transformer_config(self, layers: int | None = None) -> dict[str, Any]:
        """The transformer config with `layers` blocks per stack (the released depth when None)."""
        if layers is None:
            return dict(self.transformer)
        return dict(self.transformer) | {key: layers for key in self.depth_keys}


# google/t5-v1_1-xxl encoder, as shipped in FLUX.1-dev/text_encoder_2/config.json and
# PixArt-alpha/PixArt-XL-2-1024-MS/text_encoder/config.json (T5 v1.1: gated-GELU FFN, untied head).
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
# openai/clip-vit-large-patch14 text tower, as shipped in FLUX.1-dev/text_encoder/config.json; its ids
# 0 / 2 / 1 for bos / eos / pad are the released values (the tokenizer's own are 49406 / 49407 / 49407),
# and transformers pools at the highest id because of them, so they are kept.
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# FLUX.1-dev/vae/config.json: 16 latent channels, shift + scale, no quant convs.
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
# stabilityai/sd-vae-ft-ema, the VAE PixArt-α and Latte-1 ship (PixArt-XL-2-1024-MS/vae/config.json).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
