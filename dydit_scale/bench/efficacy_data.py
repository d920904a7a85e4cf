"""The efficacy bench's task: captioned shape images whose four attributes are known.

Each image shows one shape of a given colour and size at one of five places, with a small random
jitter, on a plain grey background; the caption names all four ("a big red circle at the top
left"). Captions are embedded by a frozen random word table (no text encoder exists offline; every
attribute is one word, so the table carries real conditioning). Because the attributes are known,
a classifier trained on the real images can check whether a generated sample follows its prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from dydit_scale.data.synthetic import COLOURS, draw_scene, scene_background

__all__ = ["ATTRIBUTES", "TEXT_DIM", "TEXT_TOKENS", "Data", "caption_of", "embed_captions", "make_data", "redraw"]

#: attribute -> its values; a label is the value's index.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow", "white", "purple"),
    "size": ("small", "big"),
    "place": ("top left", "top right", "bottom left", "bottom right", "centre"),
}
#: Diameter ÷ image side and centres: shapes this large keep outlines a small model can draw (at 0.3 /
#: 0.55 of 32² it drew blobs of the right colour and place, not of the right shape). A cross is left
#: out: at 16² its arms are 2 px wide and the static model drew it as a blob 5 times out of 8.
_DIAMETER = {"small": 0.45, "big": 0.75}
_PLACES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
           "centre": (0.5, 0.5)}
_JITTER = 0.04
TEXT_TOKENS = 8  # "a small red circle at the top left" has 8 words; shorter captions are padded
TEXT_DIM = 32
assert set(ATTRIBUTES["colour"]) <= set(COLOURS)


@dataclass
class Data:
    """Images in [-1, 1] [N, 3, S, S], caption embeddings [N, TEXT_TOKENS, TEXT_DIM] and attribute
    labels [N, 4] (columns in `ATTRIBUTES` order), split into training and held-out samples."""

    train_x: torch.Tensor
    train_c: torch.Tensor
    train_y: torch.Tensor
    held_x: torch.Tensor
    held_c: torch.Tensor
    held_y: torch.Tensor


def caption_of(labels: list[int] | torch.Tensor) -> str:
    """The caption of one attribute-label row."""
    shape, colour, size, place = (ATTRIBUTES[name][int(i)] for name, i in zip(ATTRIBUTES, labels))
    return f"a {size} {colour} {shape} at the {place}"


def embed_captions(captions: list[str], seed: int) -> torch.Tensor:
    """Frozen random word table over the task's whole vocabulary (seeded) → [N, TEXT_TOKENS, TEXT_DIM]."""
    words = {"a", "at", "the", "<pad>"} | {w for values in ATTRIBUTES.values() for v in values for w in v.split()}
    vocab = sorted(words)
    table = torch.randn(len(vocab), TEXT_DIM, generator=torch.Generator().manual_seed(seed + 7))
    index = {word: i for i, word in enumerate(vocab)}
    ids = [[index[w] for w in c.split()][:TEXT_TOKENS] for c in captions]
    return table[torch.tensor([row + [index["<pad>"]] * (TEXT_TOKENS - len(row)) for row in ids])]


def _sample(index: int, seed: int, size: int) -> tuple[np.ndarray, list[int]]:
    rng = random.Random(f"efficacy:{seed}:{index}")
    labels = [rng.randrange(len(values)) for values in ATTRIBUTES.values()]
    scene = {name: ATTRIBUTES[name][i] for name, i in zip(ATTRIBUTES, labels)}
    jitter = (rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER))
    return draw_scene(size, size, scene, scene_background(scene, rng), jitter, _DIAMETER, _PLACES), labels


def redraw(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """New real images of the scenes `labels` [N, 4] names, with fresh jitter and background, [-1, 1]:
    what a perfect model would draw for those prompts, so its FD to the held-out set is the floor."""
    pixels = []
    for index, row in enumerate(labels.tolist()):
        rng = random.Random(f"efficacy-redraw:{seed}:{index}")
        scene = {name: ATTRIBUTES[name][i] for name, i in zip(ATTRIBUTES, row)}
        jitter = (rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER))
        pixels.append(draw_scene(size, size, scene, scene_background(scene, rng), jitter, _DIAMETER, _PLACES))
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_data(count: int, heldout: int, size: int, seed: int) -> Data:
    """`count` training + `heldout` held-out samples (disjoint indices), deterministic in `seed`."""
    pixels, labels = zip(*(_sample(i, seed, size) for i in range(count + heldout)))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.tensor(labels)
    c = embed_captions([caption_of(row) for row in labels], seed)
    return Data(x[:count], c[:count], y[:count], x[count:], c[count:], y[count:])
