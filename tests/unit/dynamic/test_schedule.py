"""The router-schedule file format: exact round trip, exact lookup, derived FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch

from dydit_scale import RouterSchedule, export_schedule, make_dynamic
from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.dynamic.routers import TimestepRouter
from dydit_scale.dynamic.schedule import (
    LayerEntry,
    TimeKeys,
    TokenShape,
    UnknownTimeKeyError,
    schedule_flops_ratio,
)
from dydit_scale.models.tiny import tiny_transformer


def _synthetic(keys: torch.Tensor) -> RouterSchedule:
    g = torch.Generator().manual_seed(0)
    layers = [LayerEntry(name=f"transformer_blocks.{i}", kind="pixart", heads=4, head_dim=8, hidden=128, groups=4,
                         routers={"heads": f"transformer_blocks.{i}.head_router",
                                  "mlp": f"transformer_blocks.{i}.mlp_router"}, cross_heads=4, context_width=32)
              for i in range(2)]
    masks = {}
    for layer in layers:
        for router in layer.routers.values():
            mask = torch.rand(len(keys), 4, generator=g) > 0.5
            mask[:, 0] = True
            mask[1] = mask[0]  # a repeated mask, de-duplicated in the table
            masks[router] = mask
    shape = TokenShape(image_tokens=16, text_tokens=5)
    return RouterSchedule(time_keys=TimeKeys(keys, "ddpm_index", sampler={"name": "ddim", "steps": len(keys)}),
                          masks=masks, layers=layers, token_shape=shape,
                          flops_ratio=schedule_flops_ratio(layers, masks, shape),
                          permutations={"transformer_blocks.0.heads": torch.tensor([2, 0, 1, 3])},
                          family="pixart", base_model_hash="sha256:a", checkpoint_hash="sha256:b")


@pytest.mark.parametrize("keys", [torch.tensor([999, 749, 500, 250]), torch.tensor([1.0, 0.9882, 0.5, 0.1047])])
def test_schedule_round_trips_bit_exactly(tmp_path, keys):
    schedule = _synthetic(keys)
    loaded = RouterSchedule.load(schedule.save(tmp_path / "a"))
    assert loaded.time_keys.values.dtype == keys.dtype and torch.equal(loaded.time_keys.values, keys)
    assert loaded.masks.keys() == schedule.masks.keys()
    assert all(torch.equal(loaded.masks[k], schedule.masks[k]) for k in schedule.masks)
    assert torch.equal(loaded.flops_ratio, schedule.flops_ratio)
    assert loaded.layers == schedule.layers and loaded.token_shape == schedule.token_shape
    assert torch.equal(loaded.permutations["transformer_blocks.0.heads"], torch.tensor([2, 0, 1, 3]))
    loaded.save(tmp_path / "b")
    for name in ("schedule.safetensors", "schedule.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_unique_mask_table_deduplicates_steps():
    schedule = _synthetic(torch.tensor([999, 749, 500, 250]))
    for name, mask in schedule.masks.items():
        table, ids = schedule.unique_masks(name)
        assert torch.equal(table[ids], mask) and ids[0] == ids[1]
        assert table.shape[0] == len({tuple(row) for row in mask.tolist()})


def test_lookup_is_exact_and_unknown_time_key_is_an_error():
    schedule = _synthetic(torch.tensor([1.0, 0.9882, 0.5, 0.1047]))
    assert schedule.step_index(torch.tensor([0.5, 0.5])) == 2
    with pytest.raises(UnknownTimeKeyError, match="nearest neighbour"):
        schedule.step_index(torch.tensor([0.50001]))
    with pytest.raises(ValueError, match="share one time key"):
        schedule.step_index(torch.tensor([0.5, 1.0]))


def test_masks_without_unit_zero_are_rejected():
    schedule = _synthetic(torch.tensor([999, 500]))
    masks = {k: v.clone() for k, v in schedule.masks.items()}
    next(iter(masks.values()))[1, 0] = False
    with pytest.raises(ValueError, match="unit 0"):
        RouterSchedule(time_keys=schedule.time_keys, masks=masks, layers=schedule.layers,
                       token_shape=schedule.token_shape, flops_ratio=schedule.flops_ratio)


def test_schedule_flops_ratio_equals_the_live_ratio_of_the_masked_model():
    model = make_dynamic(tiny_transformer("pixart"), DynamicConfig(tokens=False, cross_attention=True)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, TimestepRouter)):
            router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=g) * 2)
            router.proj.bias.zero_()
    keys = torch.tensor([999, 500, 21])
    schedule = export_schedule(model, keys, token_shape=TokenShape(image_tokens=16, text_tokens=5))
    for step, key in enumerate(keys):
        with torch.no_grad():
            model(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
                  timestep=key.expand(2), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        torch.testing.assert_close(flops_ratio(model).double(), schedule.flops_ratio[step].expand(2), rtol=1e-6, atol=0)
    assert len({round(float(r), 6) for r in schedule.flops_ratio}) > 1  # the masks change with t


def test_exporting_twice_gives_the_same_file(tmp_path):
    model = make_dynamic(tiny_transformer("flux"), DynamicConfig()).eval()
    keys = torch.tensor([1.0, 0.75, 0.5])
    export_schedule(model, keys).save(tmp_path / "a")
    export_schedule(copy.deepcopy(model), keys).save(tmp_path / "b")
    for name in ("schedule.safetensors", "schedule.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("version", [0, None, "1"])
def test_a_schedule_without_a_version_this_code_wrote_is_refused(tmp_path, version):
    import json

    folder = _synthetic(torch.tensor([999, 500])).save(tmp_path)
    header = json.loads((folder / "schedule.json").read_text())
    header["format_version"] = version
    (folder / "schedule.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="format_version .* is not a version this code wrote"):
        RouterSchedule.load(folder)


def test_a_truncated_schedule_file_is_one_line_naming_it(tmp_path):
    from dydit_scale.io import UnreadableFileError

    folder = _synthetic(torch.tensor([999, 500])).save(tmp_path)
    data = (folder / "schedule.safetensors").read_bytes()
    (folder / "schedule.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError) as err:
        RouterSchedule.load(folder)
    assert "\n" not in str(err.value) and str(folder / "schedule.safetensors") in str(err.value)


def test_a_schedule_of_another_model_class_is_refused(tmp_path):
    import json

    from dydit_scale import apply_schedule

    model = make_dynamic(tiny_transformer("flux"), DynamicConfig()).eval()
    folder = export_schedule(model, torch.tensor([1.0, 0.5])).save(tmp_path)
    header = json.loads((folder / "schedule.json").read_text())
    assert header["model_class"] == "FluxTransformer2DModel" and header["family"] == "flux"
    header.update(model_class="PixArtTransformer2DModel", family="pixart")
    (folder / "schedule.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="exported for a PixArtTransformer2DModel .pixart., the model is a FluxTransformer2DModel"):
        apply_schedule(model, RouterSchedule.load(folder))
