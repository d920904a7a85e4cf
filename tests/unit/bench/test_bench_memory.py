"""`dydit-bench memory`: released-depth parameter counts, DeepSpeed's model states, measured activations."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from dydit_scale.bench import memory


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    return parser.parse_args(list(argv))


def _pixart_512_by_hand() -> tuple[int, int]:
    """PixArt-XL-2-512x512 (C = 1152, 28 blocks, no size conditions) and what DyDiT adds per block."""
    c = 1152
    embedders = 4 * 2 * 2 * c + c                       # patch conv
    embedders += 256 * c + c + c * c + c + 6 * c * c + 6 * c  # timestep MLP, adaLN-single linear
    embedders += 4096 * c + c + c * c + c               # caption projection
    final = 2 * c + c * 32 + 32                         # scale-shift table, proj_out to 2·2·8
    block = 8 * (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c) + 6 * c  # attn1, attn2, ff, table
    routers = 2 * (c * 15 + 15) + (c * 72 + 72) + (72 + 1)  # head + group routers (16 units), token router
    return embedders + 28 * block + final, routers


def test_pixart_memory_counts_parameters_by_hand_and_measures_activations(capsys):
    assert memory.run(_parse("--replica", "pixart-alpha-512", "--resolution", "64", "--threads", "1",
                             "--device", "cpu", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    base, routers = _pixart_512_by_hand()
    params = result["parameters"]
    assert params["released_transformer"] == base
    assert params["total"] == params["trainable"] == base + 28 * routers
    assert [(b["kind"], b["depth"], b["added"]) for b in result["blocks"]] == [("pixart", 28, routers)]
    assert result["image_tokens"] == 16 and result["text_tokens"] == 120
    states = result["states"]
    assert states["parameters"] + states["gradients"] + states["optimizer"] == pytest.approx(states["deepspeed_gpu"])
    activations = result["activations"]
    assert 0 < activations["checkpointing"] < activations["none"]
    assert result["fits"] == {"none": True, "checkpointing": True}
    t5_layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096  # attention, gated-GELU FFN, two RMSNorms
    t5_xxl = 32128 * 4096 + 24 * t5_layer + 32 * 64 + 4096     # + relative position bias, final norm
    frozen = result["frozen_components"]
    assert frozen["parameters"]["text_encoder"] == t5_xxl
    assert frozen["bytes"] == 2 * t5_xxl + 4 * frozen["parameters"]["vae"]  # T5 in bf16, the VAE fp32
    kept = states["parameters"] + states["gradients"] + states["optimizer"] + frozen["bytes"]
    assert result["total"] == {mode: kept + value for mode, value in activations.items()}


def test_td_lora_trains_adapters_and_routers_while_the_base_stays_stored():
    args = _parse("--replica", "pixart-alpha-512", "--resolution", "32", "--threads", "1", "--device", "cpu",
                  "--lora", "td_lora", "--zero", "2")
    result = memory.estimate(args)
    params, states = result["parameters"], result["states"]
    frozen = params["total"] - params["trainable"]
    assert 0 < params["trainable"] < params["total"] / 50
    assert states["parameters"] == 2 * params["trainable"] + 2 * frozen  # ZeRO-2: 16-bit copies everywhere
    assert states["optimizer"] == 12 * params["trainable"] / 8


@pytest.mark.parametrize("offload, offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_states_shrink_with_the_world_and_match_deepspeed(offload, offload_params):
    per_rank = []
    for world in (1, 2, 4, 8, 16):
        states = memory.model_states(10**9, 0, 10**7, world=world, nodes=max(1, world // 8), zero=3,
                                     offload=offload, offload_params=offload_params)
        kept = states["parameters"] + states["gradients"] + states["optimizer"]
        assert kept == pytest.approx(states["deepspeed_gpu"])
        per_rank.append(kept)
    if offload_params:
        assert len(set(per_rank)) == 1  # only the gathered largest layer stays on the GPU
    else:
        assert per_rank == sorted(per_rank, reverse=True) and per_rank[0] > per_rank[-1]


def test_zero2_replicates_parameters_and_partitions_the_rest():
    two, eight = (memory.model_states(10**9, 0, 10**7, world=w, nodes=1, zero=2, offload=False, offload_params=False)
                  for w in (2, 8))
    assert two["parameters"] == eight["parameters"] == 2 * 10**9
    assert eight["optimizer"] == two["optimizer"] / 4


@pytest.mark.parametrize("argv, message", [
    (["--offload-params"], "--offload-params: needs --zero 3 and --offload"),
    (["--world", "12"], "--world: 12 ranks do not fill nodes of 8"),
    (["--batch", "0"], "--batch: expected an integer >= 1"),
    (["--device", "cuda"], "--device: cuda asked for"),
    (["--resolution", "100"], "--resolution: expected a multiple of 16"),
])
def test_bad_flags_are_one_line_errors(argv, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=message):
        memory.estimate(_parse("--replica", "flux-dev", *argv))
