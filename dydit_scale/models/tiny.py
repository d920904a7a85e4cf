"""Random-init tiny diffusers pipelines, built in-process, for the tests and the CPU demo.

Nothing is downloaded: transformers, VAE and text encoders come from constructor arguments and the
tokenizers are trained on a few strings (stack.md §4). Sizes keep every test fast while leaving at
least 2 blocks of each kind and 4 attention heads, so dynamic width has something to choose from.
"""

from __future__ import annotations

from typing import Literal

import torch

Family = Literal["flux", "pixart", "latte"]

#: Constructor arguments of the tiny transformer of each family (diffusers 0.42).
TINY_TRANSFORMER_CONFIGS: dict[str, dict] = {
    "flux": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ),
    "pixart": dict(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, norm_num_groups=1,
        caption_channels=32, use_additional_conditions=False, norm_type="ada_norm_single",
    ),
    "latte": dict(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32, video_length=4,
    ),
}


def tiny_transformer(family: Family, seed: int = 0) -> torch.nn.Module:
    """A random-init tiny diffusers transformer of `family` (fp32, eval mode)."""
    from diffusers import FluxTransformer2DModel, LatteTransformer3DModel, PixArtTransformer2DModel

    classes = {"flux": FluxTransformer2DModel, "pixart": PixArtTransformer2DModel, "latte": LatteTransformer3DModel}
    torch.manual_seed(seed)
    model = classes[family](**TINY_TRANSFORMER_CONFIGS[family])
    _randomise_zero_inits(model, seed)
    return model.eval()


def _randomise_zero_inits(model: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised weights (adaLN-Zero gates, output layers) small random values.

    diffusers zero-initialises some projections, which would make a random model's blocks identity
    maps and hide bugs in the tests; a trained model has no zeros there.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


# Words the tiny tokenizers are trained on: the vocabulary of the synthetic shape captions.
_CORPUS = [
    f"a {size} {colour} {shape} at the {place}"
    for size in ("small", "large", "tiny", "big")
    for colour in ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")
    for shape in ("circle", "square", "triangle", "ring", "cross")
    for place in ("top left", "top right", "bottom left", "bottom right", "centre")
]


def _t5(max_length: int):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer(vocab=None, extra_ids=0).train_new_from_iterator(_CORPUS, vocab_size=200)
    tokenizer.model_max_length = max_length
    config = T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False,
    )
    return tokenizer, T5EncoderModel(config).eval()


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[]).train_new_from_iterator(_CORPUS, vocab_size=300)
    tokenizer.model_max_length = 77
    config = CLIPTextConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config).eval()


def _vae(latent_channels: int, flux: bool):
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **(extra if flux else {}),
    ).eval()


def tiny_pipeline(family: Family, seed: int = 0):
    """A complete random-init diffusers pipeline of `family`, built in-process."""
    import diffusers

    torch.manual_seed(seed)
    transformer = tiny_transformer(family, seed)
    if family == "flux":
        clip_tok, clip = _clip()
        t5_tok, t5 = _t5(max_length=32)
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_vae(4, flux=True),
            text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
            transformer=transformer,
        )
    t5_tok, t5 = _t5(max_length=32)
    if family == "pixart":
        return diffusers.PixArtAlphaPipeline(
            tokenizer=t5_tok, text_encoder=t5, vae=_vae(4, flux=False), transformer=transformer,
            scheduler=diffusers.DPMSolverMultistepScheduler(),
        )
    return diffusers.LattePipeline(
        tokenizer=t5_tok, text_encoder=t5, vae=_vae(4, flux=False), transformer=transformer,
        scheduler=diffusers.DDIMScheduler(),
    )


def write_tiny_pipeline(family: Family, out: str, seed: int = 0) -> None:
    """Save `tiny_pipeline(family)` as a diffusers folder that `*Pipeline.from_pretrained` loads offline."""
    tiny_pipeline(family, seed).save_pretrained(out, safe_serialization=True)
