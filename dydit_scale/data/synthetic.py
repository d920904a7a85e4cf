"""Structured synthetic samples and shards: coloured shapes named by their captions.

Used by `dydit-data synth --shards`, `dydit-bench data` and the tests. The images are not noise: a
shape of a given colour, size and place on a plain background, with the caption naming all four
("a small red circle at the top left"), in the vocabulary the tiny tokenizers are trained on
(`models/tiny.py`), so a tiny model can actually learn something in the CPU demo. Videos show the
shape drifting; they are ≥ 64 px wide because decord 0.6 fails on 16 and 48 px wide videos.

Class-conditional shards (`classes=N`) hold `.cls` instead of `.txt`: class c fixes the shape of
the scene (then its colour, size and place, as more classes need), the rest is random, so a class
label is as learnable as a caption; `classes.json` names each class ("red circle").
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from pathlib import Path
from typing import Literal

import numpy as np

from dydit_scale.data.format import CLASS_EXT, shard_pattern, write_classes, write_sizes

__all__ = ["COLOURS", "SHAPES", "SIZES", "PLACES", "MAX_CLASSES", "draw_scene", "scene_background",
           "synthetic_image", "synthetic_class_image", "class_scenes", "class_names", "synthetic_video",
           "encode_mp4", "write_synthetic_shards"]

COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "white": (250, 250, 250), "black": (10, 10, 10), "purple": (140, 50, 170), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")
SIZES = {"tiny": 0.12, "small": 0.2, "large": 0.32, "big": 0.4}
PLACES = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
          "bottom right": (0.72, 0.72), "centre": (0.5, 0.5)}
#: (width, height) of synthetic images: square, landscape and portrait, to exercise the buckets.
IMAGE_SIZES = ((256, 256), (320, 224), (224, 320), (384, 192))


def _scene(rng: random.Random) -> dict[str, str]:
    return {"size": rng.choice(list(SIZES)), "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES), "place": rng.choice(list(PLACES))}


def _caption(scene: dict[str, str]) -> str:
    return f"a {scene['size']} {scene['colour']} {scene['shape']} at the {scene['place']}"


def scene_background(scene: dict[str, str], rng: random.Random) -> tuple[int, int, int]:
    """A plain grey background, mid-grey behind white or black shapes so that they stay visible."""
    grey = rng.choice((70, 128, 180)) if scene["colour"] not in ("white", "black") else 128
    return (grey, grey, grey)


def draw_scene(width: int, height: int, scene: dict[str, str], background: tuple[int, int, int],
               offset: tuple[float, float] = (0.0, 0.0), sizes: dict[str, float] = SIZES,
               places: dict[str, tuple[float, float]] = PLACES) -> np.ndarray:
    """Render one scene as uint8 [H, W, 3]; `sizes` maps a size name to the shape's diameter ÷ the short
    side, `places` a place name to the shape's centre as fractions of width and height."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    cx = (places[scene["place"]][0] + offset[0]) * width
    cy = (places[scene["place"]][1] + offset[1]) * height
    r = sizes[scene["size"]] * min(width, height) / 2
    colour = COLOURS[scene["colour"]]
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene["shape"] == "circle":
        draw.ellipse(box, fill=colour)
    elif scene["shape"] == "square":
        draw.rectangle(box, fill=colour)
    elif scene["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif scene["shape"] == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=colour)
    return np.asarray(img)


def synthetic_image(index: int, *, seed: int = 0, size: tuple[int, int] | None = None,
                    image_format: str = "jpg") -> tuple[bytes, str, dict[str, str]]:
    """(encoded image bytes, caption, scene) of sample `index`; deterministic in (seed, index)."""
    from PIL import Image

    rng = random.Random(f"synthetic-image:{seed}:{index}")
    scene = _scene(rng)
    width, height = size or rng.choice(IMAGE_SIZES)
    pixels = draw_scene(width, height, scene, scene_background(scene, rng))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format={"jpg": "JPEG"}.get(image_format, image_format.upper()), quality=90)
    return out.getvalue(), _caption(scene), scene


#: Scene attributes a class fixes, in this order: 5 classes differ in shape, 40 in shape and colour.
_CLASS_ATTRIBUTES = (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", tuple(SIZES)), ("place", tuple(PLACES)))
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(SIZES) * len(PLACES)


def class_scenes(num_classes: int) -> list[dict[str, str]]:
    """The attributes each of `num_classes` classes fixes: as few as make the classes distinct."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"synthetic classes: expected 1 to {MAX_CLASSES} classes, got {num_classes}")
    used, combos = 1, len(_CLASS_ATTRIBUTES[0][1])
    while combos < num_classes:
        combos *= len(_CLASS_ATTRIBUTES[used][1])
        used += 1
    names = [name for name, _ in _CLASS_ATTRIBUTES[:used]]
    # product varies the last attribute fastest; reverse so consecutive classes differ in shape first
    product = itertools.product(*(values for _, values in reversed(_CLASS_ATTRIBUTES[:used])))
    return [dict(zip(reversed(names), combo)) for combo in itertools.islice(product, num_classes)]


def class_names(num_classes: int) -> list[str]:
    """Readable class names in index order ("circle", "red square", "tiny red circle at the centre", ...)."""
    out = []
    for fixed in class_scenes(num_classes):
        words = " ".join(fixed[a] for a in ("size", "colour", "shape") if a in fixed)
        out.append(words + (f" at the {fixed['place']}" if "place" in fixed else ""))
    return out


def synthetic_class_image(index: int, *, num_classes: int, seed: int = 0, size: tuple[int, int] | None = None,
                          image_format: str = "jpg") -> tuple[bytes, int, dict[str, str]]:
    """(encoded image bytes, class index, scene) of sample `index`: class `index % num_classes`."""
    from PIL import Image

    rng = random.Random(f"synthetic-class-image:{seed}:{index}")
    label = index % num_classes
    scene = {**_scene(rng), **class_scenes(num_classes)[label]}
    width, height = size or rng.choice(IMAGE_SIZES)
    pixels = draw_scene(width, height, scene, scene_background(scene, rng))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format={"jpg": "JPEG"}.get(image_format, image_format.upper()), quality=90)
    return out.getvalue(), label, scene


def encode_mp4(frames: np.ndarray, *, fps: int = 8, crf: int = 12) -> bytes:
    """Encode uint8 [F, H, W, 3] RGB frames as an H.264 mp4 in memory (PyAV, yuv420p: even sides)."""
    import av

    num_frames, height, width, _ = frames.shape
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def synthetic_video(index: int, *, seed: int = 0, size: tuple[int, int] = (96, 64), num_frames: int = 8,
                    fps: int = 8) -> tuple[bytes, str, dict[str, str]]:
    """(mp4 bytes, caption, scene): the shape drifts a little from frame to frame."""
    rng = random.Random(f"synthetic-video:{seed}:{index}")
    scene = _scene(rng)
    background = scene_background(scene, rng)
    dx, dy = rng.uniform(-0.01, 0.01), rng.uniform(-0.01, 0.01)
    frames = np.stack([draw_scene(size[0], size[1], scene, background, (dx * t, dy * t)) for t in range(num_frames)])
    return encode_mp4(frames, fps=fps), _caption(scene), scene


def write_synthetic_shards(
    out_dir: str | os.PathLike, kind: Literal["image", "video"], count: int, *, per_shard: int = 8,
    seed: int = 0, num_frames: int = 8, video_size: tuple[int, int] = (96, 64), image_format: str = "jpg",
    classes: int | None = None,
) -> list[str]:
    """Write `count` synthetic samples as `shard-%06d.tar` + sizes.json into `out_dir`; returns the paths.

    With `classes=N` (images only) each sample carries `.cls` in [0, N) instead of a caption, and
    classes.json names the classes.
    """
    import webdataset as wds

    if classes is not None and kind != "image":
        raise ValueError(f"synthetic shards: classes are for image shards, not {kind}")
    names = class_names(classes) if classes is not None else []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}

    def done(fname: str) -> None:
        written[os.path.basename(fname)] = count_in[0]
        count_in[0] = 0

    count_in = [0]
    with wds.ShardWriter(shard_pattern(out), maxcount=per_shard, verbose=0, post=done) as sink:
        for index in range(count):
            sink.write(_synthetic_sample(index, kind, seed=seed, num_frames=num_frames, video_size=video_size,
                                         image_format=image_format, classes=classes))
            count_in[0] += 1
    write_sizes(out, written)
    if names:
        write_classes(out, names)
    return [str(out / name) for name in sorted(written)]


def _synthetic_sample(index: int, kind: str, *, seed: int, num_frames: int, video_size: tuple[int, int],
                      image_format: str, classes: int | None) -> dict[str, bytes | str]:
    """One shard sample: media + `.txt` caption, or media + `.cls` label; the scene as `.json`."""
    if classes is not None:
        data, label, scene = synthetic_class_image(index, num_classes=classes, seed=seed, image_format=image_format)
        return {"__key__": f"{index:06d}", image_format: data, CLASS_EXT: str(label).encode(),
                "json": json.dumps(scene).encode()}
    if kind == "image":
        data, caption, scene = synthetic_image(index, seed=seed, image_format=image_format)
        media = {image_format: data}
    else:
        data, caption, scene = synthetic_video(index, seed=seed, size=video_size, num_frames=num_frames)
        media = {"mp4": data}
    return {"__key__": f"{index:06d}", **media, "txt": caption.encode(), "json": json.dumps(scene).encode()}
