"""Random-init tiny diffusers pipelines, built in-process, for the tests and the CPU demo.

Nothing is downloaded: transformers, VAE and text encoders come from constructor arguments and the
tokenizers are trained on a few strings, because no model hub is reachable. Each family's tiny
transformer config and pipeline layout live in its `Family` record; the parts here are shared.
Sizes keep every test fast while leaving at least 2 blocks of each kind and 4 attention heads, so
dynamic width has something to choose from.
"""

from __future__ import annotations

import torch


def tiny_transformer(family: str, seed: int = 0) -> torch.nn.Module:
    """A random-init tiny diffusers transformer of `family` (fp32, eval mode), from its `tiny_config`."""
    from dydit_scale.models.registry import get_family

    record = get_family(family)
    torch.manual_seed(seed)
    model = record.transformer_class(**record.tiny_config)
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


def t5_text_encoder(max_length: int):
    """A tiny T5 encoder and a tokenizer trained on the shape-caption vocabulary."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer(vocab=None, extra_ids=0).train_new_from_iterator(_CORPUS, vocab_size=200)
    tokenizer.model_max_length = max_length
    config = T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False,
    )
    return tokenizer, T5EncoderModel(config).eval()


def _word_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary whose merges spell every corpus word left to right, so each word is one
    token. Built by hand because the BPE trainer breaks ties between equally frequent pairs in a
    different order on every run, which would change the token ids of the same folder's captions."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted({word for caption in _CORPUS for word in caption.split()}):
        pieces = [*word[:-1], word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            if prefix + piece not in vocab:
                merges.append((prefix, piece))
                vocab[prefix + piece] = len(vocab)
            prefix += piece
    return vocab, merges


def clip_text_encoder():
    """A tiny CLIP text encoder (with pooled output) and its BPE tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _word_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    config = CLIPTextConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config).eval()


def vae(latent_channels: int, flux: bool):
    """A tiny 2-level KL VAE (scale 2); FLUX's has a shift factor and no quant convs."""
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **(extra if flux else {}),
    ).eval()


def tiny_pipeline(family: str, seed: int = 0):
    """A complete random-init diffusers pipeline of `family`, built in-process."""
    from dydit_scale.models.registry import get_family

    torch.manual_seed(seed)
    transformer = tiny_transformer(family, seed)
    return get_family(family).tiny_pipeline(transformer)


def write_tiny_pipeline(family: str, out: str, seed: int = 0) -> None:
    """Save `tiny_pipeline(family)` as a diffusers folder that `*Pipeline.from_pretrained` loads offline."""
    tiny_pipeline(family, seed).save_pretrained(out, safe_serialization=True)
