"""PNG figures that say more than tables: sample grids (and schedule / compute maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """Tile images [N, H, W, 3] (floats in [0, 1]) into one uint8 picture of `rows` rows, 2 px gaps."""
    n, h, w, _ = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, dtype=np.uint8)
    pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    for index, image in enumerate(pixels):
        r, c = divmod(index, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = image
    return grid


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


def _figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib figure to a uint8 HWC RGB picture and close it."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture


def _short(block: str) -> str:
    """transformer_blocks.3 -> 3, single_transformer_blocks.3 -> s3, temporal_transformer_blocks.3 -> t3."""
    stack, _, index = block.rpartition(".")
    return {"single_transformer_blocks": "s", "temporal_transformer_blocks": "t"}.get(stack, "") + index


def schedule_heatmap(schedule, path: str | Path) -> Path:
    """Heat-map of a `RouterSchedule` (§7.3): per role (heads, MLP groups, …) a steps × units image,
    blocks side by side with a gap, dark = active; the last panel plots the per-step FLOPs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r in ("heads", "cross_heads", "mlp", "text_mlp") if any(r in layer.routers for layer in schedule.layers)]
    titles = {"heads": "active heads", "cross_heads": "active cross-attn heads", "mlp": "active MLP groups",
              "text_mlp": "active text-MLP groups"}
    keys = schedule.time_keys.values.double().tolist()
    fig, axes = plt.subplots(1, len(roles) + 1, figsize=(5 * len(roles) + 3, 1.5 + 0.25 * len(keys)),
                             gridspec_kw={"width_ratios": [4] * len(roles) + [1.3]}, squeeze=False)
    for ax, role in zip(axes[0], roles):
        columns, ticks, labels = [], [], []
        for layer in (layer for layer in schedule.layers if role in layer.routers):
            mask = schedule.masks[layer.routers[role]].float().numpy()
            ticks.append(sum(c.shape[1] for c in columns) + mask.shape[1] / 2 - 0.5)
            labels.append(_short(layer.name))
            columns += [mask, np.full((mask.shape[0], 1), np.nan)]
        ax.imshow(np.concatenate(columns[:-1], axis=1), aspect="auto", cmap="Blues", vmin=-0.3, vmax=1.0,
                  interpolation="nearest")
        ax.set_xticks(ticks, labels, fontsize=6)
        ax.set_yticks(range(len(keys)), [f"{k:.4g}" for k in keys], fontsize=6)
        ax.set(title=titles[role], xlabel="block", ylabel="time key (step order)")
    ratio = schedule.flops_ratio.numpy()
    axes[0, -1].plot(ratio, range(len(keys)), marker="o")
    axes[0, -1].set(ylim=(len(keys) - 0.5, -0.5), xlim=(0, 1.05), title=f"FLOPs ratio\n(mean {ratio.mean():.3f})")
    axes[0, -1].set_yticks([])
    fig.tight_layout()
    return save_png(_figure_to_array(fig), path)


def compute_map(counts: np.ndarray, grid: tuple[int, int], *, blocks: int, keys: list[float],
                path: str | Path) -> Path:
    """Per-patch compute map: for every step, how many blocks ran each token's MLP (SDT, §3).

    `counts` [T, F·h·w] for one sample (frames are averaged), `grid` = (h, w) patches.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = grid
    maps = counts.reshape(counts.shape[0], -1, h, w).mean(axis=1)
    cols = min(len(maps), 8)
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols + 1, 1.9 * rows + 0.4), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(maps):
            image = ax.imshow(maps[index], cmap="viridis", vmin=0, vmax=blocks, interpolation="nearest")
            ax.set_title(f"step {index} (t={keys[index]:.4g})", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"blocks whose MLP ran (of {blocks})")
    fig.suptitle("per-patch compute (SDT)", fontsize=9)
    return save_png(_figure_to_array(fig), path)


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
