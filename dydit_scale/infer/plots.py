"""PNG figures that say more than tables: labelled sample grids, the schedule heat-map, compute maps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dydit_scale.dynamic.schedule import LayerEntry, RouterSchedule

_ROLE_TITLES = {"heads": "attention heads", "cross_heads": "cross-attention heads", "mlp": "MLP groups",
                "text_mlp": "text-MLP groups"}
_KIND_NAMES = {"flux_double": "double", "flux_single": "single", "latte_spatial": "spatial",
               "latte_temporal": "temporal"}


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's own files (it has Greek, so labels like "λ 0.5" render); PIL's
    built-in font otherwise."""
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except (OSError, ValueError):
        return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.ImageFont, width: float, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; a label longer than `max_lines` lines ends in an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while len(lines[-1]) > 1 and font.getlength(lines[-1] + "…") > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return lines or [""]


def labelled_grid(images: np.ndarray, col_labels: list[str], row_labels: list[str], *,
                  cell: int = 160) -> np.ndarray:
    """Images [rows·cols, H, W, 3] (floats in [0, 1], row-major) as one uint8 picture with a wrapped
    label above every column and beside every row, so a reader can tell which prompt and seed made
    which image. Small images are upscaled (nearest) to about `cell` px so they stay visible."""
    rows, cols = len(row_labels), len(col_labels)
    if len(images) != rows * cols:
        raise ValueError(f"labelled_grid: {len(images)} images for {rows} rows × {cols} columns")
    _, h, w, _ = images.shape
    scale = max(1, round(cell / max(h, w)))
    h, w = h * scale, w * scale
    font = _font(max(12, min(w, h) // 12))
    line = round(font.size * 1.25)
    heads = [_wrap(label, font, w - 6) for label in col_labels]
    sides = [_wrap(label, font, max(w, 120) - 6, max_lines=4) for label in row_labels]
    top = max(len(lines) for lines in heads) * line + 8
    left = max(font.getlength(text) for lines in sides for text in lines) + 14
    left, gap = math.ceil(left), 4
    canvas = Image.new("RGB", (left + cols * (w + gap), top + rows * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    for index, picture in enumerate(pixels):
        r, c = divmod(index, cols)
        tile = Image.fromarray(picture).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (left + c * (w + gap), top + r * (h + gap)))
    for c, lines in enumerate(heads):
        for k, text in enumerate(lines):
            x = left + c * (w + gap) + (w - font.getlength(text)) / 2
            draw.text((x, 4 + k * line), text, fill="black", font=font)
    for r, lines in enumerate(sides):
        y0 = top + r * (h + gap) + (h - len(lines) * line) / 2
        for k, text in enumerate(lines):
            draw.text((6, y0 + k * line), text, fill="black", font=font)
    return np.asarray(canvas)


def save_png(picture: np.ndarray, path: str | Path, min_side: int = 256) -> Path:
    """Write a uint8 HWC picture as PNG, upscaled (nearest) so tiny test images stay visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(picture)
    scale = max(1, min_side // max(1, min(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported late: it is slow and needs no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_to_array(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure to a uint8 HWC RGB picture and close it."""
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return picture


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render a matplotlib figure to `path` (PNG, written atomically) and close it."""
    return save_png(_figure_to_array(fig), path)


def block_label(layer: LayerEntry) -> str:
    """A block's name as a reader says it: `single_transformer_blocks.3` of FLUX -> `single 3`."""
    index = layer.name.rpartition(".")[2]
    return f"{_KIND_NAMES.get(layer.kind, 'block')} {index}"


def _thinned(count: int, room: int) -> list[int]:
    """Indices of at most `room` evenly spaced labels out of `count` (all of them when they fit)."""
    step = max(1, math.ceil(count / max(1, room)))
    return list(range(0, count, step))


def _role_panel(ax, schedule: RouterSchedule, role: str, cmap, norm, label_room: int) -> None:
    """One role's steps × units image: blocks side by side, a blank column between blocks."""
    columns, centres, labels = [], [], []
    for layer in (layer for layer in schedule.layers if role in layer.routers):
        mask = schedule.masks[layer.routers[role]].float().numpy()
        start = sum(c.shape[1] for c in columns)
        centres.append(start + mask.shape[1] / 2 - 0.5)
        labels.append(block_label(layer))
        columns += [mask, np.full((mask.shape[0], 1), np.nan)]
    ax.imshow(np.concatenate(columns[:-1], axis=1), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    shown = _thinned(len(labels), label_room)
    ax.set_xticks([centres[i] for i in shown], [labels[i] for i in shown], fontsize=8,
                  rotation=90 if len(shown) > label_room // 4 else 0)
    ax.set_title(f"active {_ROLE_TITLES[role]}", fontsize=10)
    ax.set_xlabel("block (each a band of its units)", fontsize=9)


def schedule_figure(schedule: RouterSchedule) -> Figure:
    """The schedule heat-map as a matplotlib figure: per role (heads, MLP groups, …) a steps × units
    image with the blocks side by side (dark = unit computed at that step), then the per-step FLOPs
    ratio against the target λ. Returned so callers and tests can inspect or restyle it."""
    plt = pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    roles = [r for r in _ROLE_TITLES if any(r in layer.routers for layer in schedule.layers)]
    keys = schedule.time_keys.values.double().tolist()
    height = min(11.0, 3.2 + 0.22 * len(keys))
    panel = min(9.0, max(4.5, 0.22 * len(schedule.layers)))
    fig, axes = plt.subplots(1, len(roles) + 1, figsize=(panel * len(roles) + 3.2, height), sharey=True,
                             gridspec_kw={"width_ratios": [panel] * len(roles) + [2.2]}, squeeze=False)
    cmap, norm = plt.get_cmap("Blues").with_extremes(bad="white"), Normalize(vmin=-0.3, vmax=1.0)
    for ax, role in zip(axes[0], roles):
        _role_panel(ax, schedule, role, cmap, norm, label_room=int(panel * 5))
    shown = _thinned(len(keys), int(height * 4))
    axes[0, 0].set_yticks(shown, [f"{i}  t={keys[i]:.3g}" for i in shown], fontsize=8)
    axes[0, 0].set_ylabel("sampling step (first = most noise)", fontsize=9)
    ratio_ax, ratio = axes[0, -1], schedule.flops_ratio.double().numpy()
    ratio_ax.plot(ratio, range(len(keys)), marker="o", markersize=3, color="tab:blue")
    handles = [Line2D([], [], color="tab:blue", marker="o", markersize=3,
                      label=f"FLOPs ratio per step (mean {ratio.mean():.3f})")]
    if schedule.target_flops_ratio is not None:
        lam = schedule.target_flops_ratio
        ratio_ax.axvline(lam, color="tab:red", linestyle="--")
        handles.append(Line2D([], [], color="tab:red", linestyle="--", label=f"target λ = {lam:g}"))
    ratio_ax.set_xlim(0, 1.05)
    ratio_ax.set_title("FLOPs ratio", fontsize=10)
    ratio_ax.set_xlabel("of the full model", fontsize=9)
    ratio_ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=cmap(norm(1.0)), label="active (computed)"), Patch(color=cmap(norm(0.0)), label="skipped"),
               Patch(facecolor="white", edgecolor="grey", label="gap between blocks"), *handles]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / height), ncol=len(handles),
               fontsize=8, frameon=False)
    fig.suptitle("router schedule: which units each sampling step computes", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / height))
    return fig


def schedule_heatmap(schedule: RouterSchedule, path: str | Path) -> Path:
    """Write `schedule_figure(schedule)` as a PNG."""
    return save_figure(schedule_figure(schedule), path)


def compute_figure(counts: np.ndarray, grid: tuple[int, int], *, blocks: int, keys: list[float],
                   cached: tuple[int, ...] = ()) -> Figure:
    """Per-patch compute map as a matplotlib figure: for every step, how many blocks ran each
    token's MLP. The colour scale spans the counts that occur (a handful of levels would otherwise
    look flat), one colour per count when the counts are whole numbers.

    `counts` [T, F·h·w] for one sample (frames are averaged), `grid` = (h, w) patches; `cached`: the
    steps a step cache reused, titled as such (only their always-computed blocks count).
    """
    plt = pyplot()
    from matplotlib.colors import BoundaryNorm, Normalize

    h, w = grid
    maps = counts.reshape(counts.shape[0], -1, h, w).mean(axis=1)
    low, high = float(maps.min()), float(maps.max())
    whole = bool(np.all(maps == np.round(maps)))
    if whole:
        levels = np.arange(low - 0.5, high + 1.0)
        cmap, norm = plt.get_cmap("viridis", len(levels) - 1), BoundaryNorm(levels, len(levels) - 1)
    else:
        cmap = plt.get_cmap("viridis")
        norm = Normalize(low - 0.5, high + 0.5) if high == low else Normalize(low, high)
    cols = min(len(maps), max(4, math.ceil(math.sqrt(1.5 * len(maps)))))
    rows = -(-len(maps) // cols)
    side = 2.4
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols * max(1.0, w / h) + 1.6, side * rows + 1.0),
                             squeeze=False, layout="constrained")
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index < len(maps):
            image = ax.imshow(maps[index], cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(f"step {index}  (t={keys[index]:.3g}){'  cached' if index in cached else ''}", fontsize=9)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85, pad=0.02)
    bar.set_label(f"blocks whose MLP ran (of {blocks})", fontsize=9)
    if whole:
        bar.set_ticks(np.arange(low, high + 1, max(1, math.ceil((high - low + 1) / 12))))
    spread = (f"colours span {low:g}–{high:g} of {blocks} blocks" if high > low
              else f"every patch ran {low:g} of {blocks} blocks at every step: no spatial variation")
    reused = f"; {len(cached)} of {len(maps)} steps reused by the step cache (their middle blocks skipped)" if cached else ""
    fig.suptitle(f"per-patch compute, {h}×{w} patches: {spread}{reused}", fontsize=10)
    return fig


def compute_map(counts: np.ndarray, grid: tuple[int, int], *, blocks: int, keys: list[float],
                path: str | Path, cached: tuple[int, ...] = ()) -> Path:
    """Write `compute_figure(...)` as a PNG."""
    return save_figure(compute_figure(counts, grid, blocks=blocks, keys=keys, cached=cached), path)


def save_mp4(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write uint8 frames [F, H, W, 3] as an MPEG-4 video with PyAV (the `video` extra)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # yuv420p needs even sides
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path
