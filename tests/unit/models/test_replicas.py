"""Replicas of the released pipelines: full-depth sizes on the meta device, written folders that the
stock pipelines and our loaders read offline, tokenizers with the released ids, and `dydit-data synth --replica`."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_tools import cli, synth_model
from dydit_scale.models.loading import detect_family, load_pipeline, load_transformer
from dydit_scale.models.registry import all_replicas, get_replica
from dydit_scale.models.replica_tokenizers import clip_tokenizer, t5_tokenizer

NAMES = ["flux-dev", "flux-schnell", "pixart-alpha-1024", "pixart-alpha-512", "latte-1", "dit-xl-2-256"]
# Parameters of the released transformers: FLUX.1-dev 11.90 B, schnell the same less the guidance embedder,
# PixArt-XL-2 0.61 B (1024-MS adds the resolution and aspect-ratio embedders), Latte-1 28 + 28 blocks,
# DiT-XL/2 674.8 M (675 M with its fixed position table) plus the 27 extra copies of the 2.78 M timestep
# and label embedders that diffusers keeps in every block.
RELEASED_PARAMS = {"flux-dev": 11.901e9, "flux-schnell": 11.891e9, "pixart-alpha-1024": 0.611e9,
                   "pixart-alpha-512": 0.611e9, "latte-1": 1.057e9, "dit-xl-2-256": 674.83e6 + 27 * 2.777e6}
WIDTHS = {"flux": (24, 128), "pixart": (16, 72), "latte": (16, 72), "dit": (16, 72)}
ENCODERS = {"flux": {"t5", "clip"}, "pixart": {"t5"}, "latte": {"t5"}, "dit": set()}
# T5-v1.1-XXL encoder 4.76 B, CLIP-L text tower 123 M, FLUX's 16-channel VAE 83.8 M, sd-vae-ft-ema 83.7 M.
ENCODER_PARAMS = {"t5": 4.762e9, "clip": 123.06e6}
VAE_PARAMS = {16: 83.82e6, 4: 83.65e6}
CAPTIONS = ["a small red circle at the top left", "A photo of a café by the sea, 3 dogs & a cat!"]


def _synth_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    synth_model.add_model_arguments(parser)
    return parser


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_replica_is_registered_and_documented():
    assert list(all_replicas()) == NAMES
    help_text = " ".join(action.help or "" for action in _synth_parser()._actions)
    for name in NAMES:
        assert name in cli.__doc__ and name in help_text


@pytest.mark.parametrize("name", NAMES)
def test_released_depth_builds_on_meta_at_the_released_size(name):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    family, replica = get_replica(name)
    with torch.device("meta"):
        transformer = family.transformer_class(**replica.transformer_config())
        vae = diffusers.AutoencoderKL(**replica.vae)
        encoders = {enc.kind: (T5EncoderModel(T5Config(**enc.config)) if enc.kind == "t5"
                               else CLIPTextModel(CLIPTextConfig(**enc.config)))
                    for enc in replica.text_encoders.values()}
    assert _params(transformer) == pytest.approx(RELEASED_PARAMS[name], rel=0.005)
    config = transformer.config
    assert (config.num_attention_heads, config.attention_head_dim) == WIDTHS[family.name]
    assert _params(vae) == pytest.approx(VAE_PARAMS[replica.vae["latent_channels"]], rel=0.001)
    assert set(encoders) == ENCODERS[family.name]
    for kind, encoder in encoders.items():
        assert _params(encoder) == pytest.approx(ENCODER_PARAMS[kind], rel=0.001)
    if "t5" in encoders:
        assert encoders["t5"].config.d_model == 4096 and encoders["t5"].config.num_layers == 24
    if "clip" in encoders:
        assert encoders["clip"].config.hidden_size == 768 and encoders["clip"].config.num_hidden_layers == 12


def test_tokenizers_have_the_released_ids_and_are_the_same_every_run():
    t5, clip = t5_tokenizer(120), clip_tokenizer(77, "<|endoftext|>")
    assert len(t5) == 32100 and (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]
    assert len(clip) == 49408 and (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (49406, 49407, 49407)
    assert t5.get_vocab() == t5_tokenizer(120).get_vocab()
    assert clip.get_vocab() == clip_tokenizer(77, "<|endoftext|>").get_vocab()
    for ids in t5(CAPTIONS).input_ids:
        assert ids[-1] == 1 and max(ids) < 32000 and ids.count(2) <= 1  # only "é" is unknown
    for ids in clip(CAPTIONS).input_ids:
        assert ids[0] == 49406 and ids[-1] == 49407 and max(ids[1:-1]) < 49406
    decoded = clip.decode(clip(CAPTIONS[1]).input_ids, skip_special_tokens=True)  # "sea , 3", as CLIP's
    assert decoded.replace(" ", "") == CAPTIONS[1].lower().replace(" ", "")


WRITTEN = [  # one replica per family, 1 block per stack and 1 text layer, as the other tests use them
    pytest.param("flux-dev", dict(dtype="bf16"), id="flux-dev-bf16"),
    pytest.param("pixart-alpha-512", dict(layers=1), id="pixart-alpha-512"),
    pytest.param("latte-1", dict(layers=1), id="latte-1"),
    pytest.param("dit-xl-2-256", dict(layers=1), id="dit-xl-2-256"),
]


def _weight_files(folder: Path, stem: str, shards: int) -> list[Path]:
    """The component's weight files, checked to be laid out as `save_pretrained` lays out `shards` of them."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / f"{stem}.safetensors.index.json"
    if shards == 1:
        assert [f.name for f in files] == [f"{stem}.safetensors"] and not index.exists()
    else:
        assert [f.name for f in files] == [f"{stem}-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
        assert set(json.loads(index.read_text())["weight_map"].values()) == {f.name for f in files}
    return files


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs"), WRITTEN)
def test_written_replica_has_the_released_layout_and_loads(replica_folder, name, kwargs):
    family, replica = get_replica(name)
    folder = replica_folder(name, **kwargs)
    dtype = torch.bfloat16 if kwargs.get("dtype") == "bf16" else torch.float32

    files = _weight_files(folder / "transformer", "diffusion_pytorch_model", replica.transformer_shards)
    _weight_files(folder / "vae", "diffusion_pytorch_model", 1)
    for component, encoder in replica.text_encoders.items():
        _weight_files(folder / component, "model", encoder.shards)
    with safe_open(files[0], "pt") as weights:
        assert weights.get_slice(next(iter(weights.keys()))).get_dtype() == ("BF16" if dtype == torch.bfloat16 else "F32")

    assert detect_family(folder) == family.name
    pipe = load_pipeline(folder, dtype=dtype)
    assert type(pipe).__name__ == family.pipeline_class
    layers = kwargs.get("layers", replica.default_layers)
    for key, value in replica.transformer_config(layers).items():  # full width, `layers` deep
        assert pipe.transformer.config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert _params(load_transformer(folder, family.name, dtype=dtype)) == _params(pipe.transformer)

    tokenizers = {"t5": (32100, 0, 1), "clip": (49408, 49407, 49407)}
    for component, encoder in replica.text_encoders.items():
        tokenizer = getattr(pipe, component.replace("text_encoder", "tokenizer"))
        assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == tokenizers[encoder.kind]
        assert tokenizer.model_max_length == encoder.tokenizer["model_max_length"]
        assert getattr(pipe, component).config.vocab_size >= len(tokenizer)
    if not replica.text_encoders:  # class-conditional: no text side
        return
    text = family.encode_text(pipe, CAPTIONS, max_tokens=16, device=torch.device("cpu"))
    assert text["prompt_embeds"].shape[0] == 2 and text["prompt_embeds"].shape[-1] == 4096
    assert all(value.isfinite().all() for value in text.values())
    if family.name == "flux":
        assert text["pooled_prompt_embeds"].shape == (2, 768)


@pytest.mark.slow
def test_synth_replica_replaces_a_pipeline_folder_and_says_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "latte"  # an earlier pipeline: its components go, none of their files are left
    for component in ("transformer", "text_encoder_2"):
        (out / component).mkdir(parents=True)
        (out / component / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "X"], "text_encoder_2": ["x", "Y"]}))
    assert cli.main(["synth", "--replica", "latte-1", str(out), "--layers", "1", "--dtype", "bf16"]) == 0
    said = capsys.readouterr().out
    assert said == (f"wrote latte-1 replica (bf16, 1 block(s) per stack, 1 text layer(s)) to {out}: "
                    "text_encoder 0.65 GB in 4 shards, transformer 0.11 GB, vae 0.17 GB\n")
    assert not (out / "text_encoder_2").exists()
    assert [f.name for f in (out / "transformer").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["num_layers"] == 1 and config["num_attention_heads"] == 16
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "LattePipeline"
    shutil.rmtree(out)  # 0.9 GB that pytest would keep for three sessions


@pytest.mark.parametrize(("argv", "message"), [
    (["--replica", "flux-pro"], "--replica: expected one of flux-dev, flux-schnell, pixart-alpha-1024, "
                                "pixart-alpha-512, latte-1, dit-xl-2-256, got 'flux-pro'"),
    (["--replica", "latte-1", "--layers", "0"], "--layers and --text-layers must be >= 1"),
    (["--replica", "latte-1", "--shards", "image"], "give exactly one of --tiny-model FAMILY, --replica NAME"),
])
def test_synth_replica_refuses_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
    assert cli.main(["synth", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_synth_replica_leaves_a_foreign_folder_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["synth", "--replica", "pixart-alpha-512", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"dydit-data synth: {tmp_path}: exists and is not a pipeline folder; choose an empty or new folder\n"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
