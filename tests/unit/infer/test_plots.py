"""The PNG figures: schedule heat-map, compute map and labelled sample grids read well for any size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from infer_cases import dynamic_model
from PIL import Image

from dydit_scale.infer.export import export_schedule
from dydit_scale.infer.plots import (
    compute_figure, compute_map, labelled_grid, schedule_figure, schedule_heatmap,
)


@pytest.fixture(scope="module")
def flux_schedule():
    return export_schedule(dynamic_model("flux", target_flops_ratio=0.6), torch.linspace(1.0, 0.05, 8))


def _many_blocks(schedule, copies: int, steps: int):
    """The schedule's blocks repeated `copies` times over `steps` steps (a stand-in for a big model)."""
    layers, masks = [], {}
    for copy in range(copies):
        for layer in schedule.layers:
            routers = {role: f"{key}.copy{copy}" for role, key in layer.routers.items()}
            for role, key in layer.routers.items():
                masks[routers[role]] = schedule.masks[key][torch.arange(steps) % schedule.steps]
            stack, _, index = layer.name.rpartition(".")
            layers.append(dataclasses.replace(layer, name=f"{stack}.{int(index) + 2 * copy}", routers=routers))
    keys = dataclasses.replace(schedule.time_keys, values=torch.linspace(1.0, 0.01, steps))
    return dataclasses.replace(schedule, layers=layers, masks=masks, time_keys=keys,
                               flops_ratio=torch.rand(steps, dtype=torch.float64))


def _texts(artists) -> list[str]:
    return [a.get_text() for a in artists]


def _overlapping(labels) -> bool:
    boxes = [label.get_window_extent() for label in labels if label.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_schedule_figure_names_blocks_and_draws_lambda(flux_schedule):
    fig = schedule_figure(flux_schedule)
    heads, mlp, ratio = fig.axes[:3]
    assert _texts(heads.get_xticklabels()) == ["double 0", "double 1", "single 0", "single 1"]
    assert heads.get_title() == "active attention heads" and mlp.get_title() == "active MLP groups"
    assert _texts(heads.get_yticklabels())[0] == "0  t=1"
    legend = _texts(fig.legends[0].get_texts())
    assert legend[:3] == ["active (computed)", "skipped", "gap between blocks"]
    assert "target λ = 0.6" in legend and any(text.startswith("FLOPs ratio per step") for text in legend)
    assert any(np.allclose(line.get_xdata(), 0.6) for line in ratio.get_lines())  # the λ line


def test_schedule_ticks_are_thinned_and_never_overlap(flux_schedule, tmp_path):
    fig = schedule_figure(_many_blocks(flux_schedule, copies=30, steps=60))  # 120 blocks, 60 steps
    fig.canvas.draw()
    heads = fig.axes[0]
    shown = _texts(heads.get_xticklabels())
    assert 10 <= len(shown) < 120 and shown[0] == "double 0"
    assert 10 <= len(heads.get_yticklabels()) < 60
    assert not _overlapping(heads.get_xticklabels()) and not _overlapping(heads.get_yticklabels())
    assert Image.open(schedule_heatmap(_many_blocks(flux_schedule, 3, 8), tmp_path / "s.png")).size[0] > 1000


def test_compute_map_colours_span_the_counts_that_occur(tmp_path):
    counts = np.array([[5, 6, 6, 5], [6, 6, 6, 6], [5, 5, 5, 6]], dtype=float)  # a 2×2 token grid, 3 steps
    fig = compute_figure(counts, (2, 2), blocks=6, keys=[1.0, 0.5, 0.1])
    image = fig.axes[0].get_images()[0]
    assert image.norm.vmin == 4.5 and image.norm.vmax == 6.5  # one colour per count 5 and 6, not 0..6
    assert fig.axes[0].get_title() == "step 0  (t=1)"
    width, height = fig.get_size_inches()
    assert width >= 2 * 3 and height >= 2  # panels of a few inches, not thumbnails
    assert "blocks whose MLP ran (of 6)" in fig.axes[-1].get_ylabel()  # the colorbar
    path = compute_map(counts, (2, 2), blocks=6, keys=[1.0, 0.5, 0.1], path=tmp_path / "c.png")
    assert Image.open(path).size[0] > 500


def test_compute_map_marks_the_steps_a_step_cache_reused():
    fig = compute_figure(np.array([[4.0] * 4, [1.0] * 4]), (2, 2), blocks=4, keys=[1.0, 0.5], cached=(1,))
    assert [ax.get_title() for ax in fig.axes[:2]] == ["step 0  (t=1)", "step 1  (t=0.5)  cached"]
    assert "1 of 2 steps reused by the step cache" in fig._suptitle.get_text()


def test_compute_map_with_one_count_everywhere_still_draws():
    fig = compute_figure(np.full((2, 16), 3.0), (4, 4), blocks=4, keys=[1.0, 0.5])
    assert fig.axes[0].get_images()[0].norm.vmin < 3 < fig.axes[0].get_images()[0].norm.vmax


def test_labelled_grid_writes_prompts_above_columns_and_seeds_beside_rows():
    images = np.zeros((4, 32, 32, 3))  # black tiles: every non-white pixel outside them is text
    prompts = ["a red circle", "a very long prompt " * 6]
    grid = labelled_grid(images, prompts, ["seed 0", "seed 1"])
    dark = grid.min(axis=2) < 128
    top = int(np.argmax(dark.all(axis=1) | (dark.sum(axis=1) > 300)))  # first row of tiles
    left = int(np.argmax(dark[top:].sum(axis=0) > 300))  # first column of tiles
    assert top > 20 and left > 30
    tile = (grid.shape[1] - left) // 2
    for column in range(2):  # text above each column
        assert dark[:top, left + column * tile: left + (column + 1) * tile].any()
    assert dark[top: top + tile, :left].any() and dark[top + tile:, :left].any()  # text beside each row
    assert top < 80  # the long prompt is wrapped into a few lines, not one endless one
    with pytest.raises(ValueError, match="3 images for 2 rows"):
        labelled_grid(images[:3], prompts, ["seed 0", "seed 1"])
