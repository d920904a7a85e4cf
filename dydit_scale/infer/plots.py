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
