"""Class-conditional (.cls) samples: labels in batches, never mixed with captions, bad labels counted."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
from shard_fixtures import good_images, png_bytes, write_shard

from data_tools import validate
from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader
from dydit_scale.data.format import (
    CLASS_EXT, DataFormatError, read_class, read_condition, sample_kind,
)
from dydit_scale.data.image_text import Item, collate, transform_latent

#: key → label of the class samples below; every third one also has a .txt (kept as its caption)
CLASS_LABELS = {f"c{i:03d}": (i * 7) % 5 for i in range(12)}
#: one sample per way a label can be wrong, and one with neither caption nor label
BAD = {"neg": b"-1", "word": b"goldfish", "frac": b"3.5", "empty": b"", "plus": b"+2"}


def _class_samples() -> list[dict]:
    samples = []
    for i, (key, label) in enumerate(CLASS_LABELS.items()):
        sample = {"__key__": key, "png": png_bytes((40, 40), (20 * label, 90, 90)), CLASS_EXT: str(label).encode()}
        if i % 3 == 0:
            sample["txt"] = f"class {label}".encode()
        samples.append(sample)
    return samples


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """shard 0: class and caption samples interleaved; shard 1: bad labels, no caption/label, 2 good."""
    root = tmp_path_factory.mktemp("class_shards")
    captioned = good_images("t", 10)
    interleaved = [s for pair in zip(_class_samples(), captioned + [None] * 2) for s in pair if s is not None]
    write_shard(root / "shard-000000.tar", interleaved)
    bad = [{"__key__": key, "png": png_bytes((40, 40)), CLASS_EXT: raw} for key, raw in BAD.items()]
    bad.append({"__key__": "bare", "png": png_bytes((40, 40))})
    write_shard(root / "shard-000001.tar", bad + good_images("g", 2))
    return root


def _val_loader(root, batch_size: int = 2):
    cfg = DataConfig(shards=str(root), val_shards=str(root), resolution=32, batch_size=batch_size, workers=0)
    return build_loader(cfg, seed=0, split="val", rank=0, world_size=1, buckets=False)


def test_loader_yields_labels_for_cls_samples_and_never_mixes_kinds(mixed_shards):
    seen_class = seen_caption = 0
    for batch in _val_loader(mixed_shards):
        names = [key.split("/")[1] for key in batch["keys"]]
        if "labels" in batch:
            assert batch["labels"].dtype == torch.long and batch["labels"].shape == (len(names),)
            assert batch["labels"].tolist() == [CLASS_LABELS[n] for n in names]
            assert all(c in ("", f"class {CLASS_LABELS[n]}") for n, c in zip(names, batch["captions"]))
            seen_class += 1
        else:
            assert not any(n in CLASS_LABELS for n in names)
            assert all(c.startswith("a red square") for c in batch["captions"])
            seen_caption += 1
    assert seen_class and seen_caption
    captions = {c for batch in _val_loader(mixed_shards) if "labels" in batch for c in batch["captions"]}
    assert "" in captions and any(c.startswith("class ") for c in captions)  # .txt kept when present


def test_bad_labels_are_decode_errors_and_bare_samples_missing_caption(mixed_shards):
    loader = _val_loader(mixed_shards)
    keys = [k.split("/")[1] for batch in loader for k in batch["keys"]]
    assert {r: n for r, n in loader.skipped.items() if n} == {"decode_error": len(BAD), "missing_caption": 1}
    assert not set(keys) & (set(BAD) | {"bare"})


def test_validate_agrees_with_the_loader(mixed_shards, capsys):
    loader = _val_loader(mixed_shards)
    list(loader)
    parser = argparse.ArgumentParser()
    validate.add_arguments(parser)
    assert validate.run(parser.parse_args([str(mixed_shards), "--json"])) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["bad"] == {r: n for r, n in loader.skipped.items() if n}
    assert report["shards"][str(mixed_shards / "shard-000000.tar")]["bad"] == {}


@pytest.mark.parametrize("raw", list(BAD.values()) + [b"\xff\xfe", b"1 2", "٣".encode()])
def test_read_class_refuses_anything_but_a_non_negative_integer(raw):
    with pytest.raises(DataFormatError) as info:
        read_class({"__key__": "k042", CLASS_EXT: raw})
    assert info.value.reason == "decode_error"
    assert "k042" in str(info.value) and "\n" not in str(info.value)


def test_read_class_and_condition():
    assert read_class({"__key__": "k", CLASS_EXT: b"207\n"}) == 207
    assert read_class({"__key__": "k", CLASS_EXT: b"0"}) == 0
    assert read_class({"__key__": "k"}) is None
    assert read_condition({"__key__": "k", CLASS_EXT: b"3"}) == ("", 3)
    assert read_condition({"__key__": "k", CLASS_EXT: b"3", "txt": b" tench "}) == ("tench", 3)
    assert read_condition({"__key__": "k", "txt": b"a cat"}) == ("a cat", None)
    with pytest.raises(DataFormatError, match=r"no caption \(\.txt\) or class label \(\.cls\)") as info:
        read_condition({"__key__": "k", "txt": b"  "})
    assert info.value.reason == "missing_caption"


def test_collate_refuses_a_mixed_bucket():
    pixels = {"pixels": torch.zeros(3, 16, 16, dtype=torch.uint8)}
    items = [Item("a/1", "", {}, ("image",), pixels, 3), Item("a/2", "a cat", {}, ("image",), pixels)]
    with pytest.raises(ValueError, match="1 of 2 items have no class label"):
        collate(items)
    batch = collate([items[0], Item("a/3", "x", {}, ("image",), pixels, 0)])
    assert batch["labels"].tolist() == [3, 0] and batch["captions"] == ["", "x"]


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def test_pre_encoded_class_samples_need_no_text_embeddings(tmp_path):
    latent = _npy(np.ones((4, 4, 4), np.float32))
    samples = [{"__key__": f"l{i}", "latent.npy": latent, CLASS_EXT: str(i).encode()} for i in range(4)]
    samples.insert(0, {"__key__": "nothing", "latent.npy": latent})  # neither .text.npy nor .cls
    write_shard(tmp_path / "shard-000000.tar", samples)
    sample = {"__key__": "l0", "latent.npy": latent, CLASS_EXT: b"1"}
    assert sample_kind(sample) == "latent" and transform_latent(sample).label == 1
    cfg = DataConfig(shards=str(tmp_path), val_shards=str(tmp_path), batch_size=2, workers=0)
    loader = build_loader(cfg, seed=0, split="val", rank=0, world_size=1)
    batches = list(loader)
    assert batches and all("text_embeds" not in b and b["latents"].shape == (2, 4, 4, 4) for b in batches)
    assert all(b["labels"].tolist() == [int(k[-1]) for k in b["keys"]] for b in batches)
    assert {r: n for r, n in loader.skipped.items() if n} == {"missing_media": 1}
    report, bad = validate.validate_shard(str(tmp_path / "shard-000000.tar"), min_frames=1, min_side=0)
    assert report["bad"] == {"missing_media": 1} and bad[0][0] == "nothing"
