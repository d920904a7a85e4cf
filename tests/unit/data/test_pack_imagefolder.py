"""`dydit-data pack` from an ImageFolder tree, `synth --classes` and `encode` of class-conditional shards."""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from shard_fixtures import png_bytes

from data_tools import encode, pack, stats, synth_shards, validate
from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader
from dydit_scale.data.format import CLASSES_FILE, read_classes, read_sizes

#: class folder → image count; created out of order so that sorting is what numbers them
TREE = {"zebra": 3, "ant": 2, "mole": 4}
CLASSES = {"0": "ant", "1": "mole", "2": "zebra"}


def _run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _image_tree(root: Path) -> Path:
    for name, count in TREE.items():
        for i in range(count):
            folder = root / name / ("nested" if i == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}{i}.png").write_bytes(png_bytes((40, 40), (30 * i, 60, 90)))
    (root / "mole" / "mole0.txt").write_text("a mole, with a caption")
    (root / "README.md").write_text("not media: ignored")
    return root


def _members(folder: Path) -> dict[str, dict[str, bytes]]:
    """key → {extension: bytes} over every shard of `folder`."""
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_pack_imagefolder_writes_cls_and_sorted_classes(tmp_path, capsys):
    src = _image_tree(tmp_path / "src")
    (src / "ant" / "ant1.png").write_bytes(b"not an image")  # left out, counted
    assert pack.resolve_layout(str(src), "auto") == "imagefolder"
    assert _run(pack, [str(src), str(tmp_path / "out"), "--max-count", "3"]) == 0
    out, err = capsys.readouterr()
    assert "1 item(s) with an undecodable image left out" in out and str(src / "ant" / "ant1.png") in err
    assert json.loads((tmp_path / "out" / CLASSES_FILE).read_text()) == CLASSES
    samples = _members(tmp_path / "out")
    assert len(samples) == sum(TREE.values()) - 1 == sum(read_sizes(tmp_path / "out").values())
    index = {name: int(i) for i, name in CLASSES.items()}
    for members in samples.values():
        source = Path(json.loads(members["json"])["source"])
        name = source.relative_to(src).parts[0]
        assert members["cls"] == str(index[name]).encode() and json.loads(members["json"])["class_name"] == name
        assert ("txt" in members) == (source.name == "mole0.png")
    assert _run(validate, [str(tmp_path / "out"), "--json"]) == 0
    capsys.readouterr()
    batch = next(iter(build_loader(DataConfig(shards=str(tmp_path / "out"), resolution=32, batch_size=2,
                                              workers=0), seed=0, rank=0, world_size=1)))
    assert batch["labels"].tolist() == [index[meta["class_name"]] for meta in batch["meta"]]


def test_pack_imagefolder_resumes_after_an_interruption(tmp_path, monkeypatch):
    src = _image_tree(tmp_path / "src")
    argv = ["--max-count", "2", "--layout", "imagefolder"]
    assert _run(pack, [str(src), str(tmp_path / "clean"), *argv]) == 0
    original = pack._sample

    def failing(index, entry, data):
        if index == 5:
            raise KeyboardInterrupt
        return original(index, entry, data)

    monkeypatch.setattr(pack, "_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        _run(pack, [str(src), str(tmp_path / "resumed"), *argv])
    monkeypatch.setattr(pack, "_sample", original)
    assert (tmp_path / "resumed" / pack.PROGRESS_FILE).is_file()
    assert _run(pack, [str(src), str(tmp_path / "resumed"), *argv]) == 0
    assert _members(tmp_path / "resumed") == _members(tmp_path / "clean")
    assert read_sizes(tmp_path / "resumed") == read_sizes(tmp_path / "clean")
    assert read_classes(tmp_path / "resumed") == {int(i): n for i, n in CLASSES.items()}
    assert not (tmp_path / "resumed" / pack.PROGRESS_FILE).exists()


def test_pack_layout_choice_and_empty_class_folder(tmp_path, capsys):
    src = _image_tree(tmp_path / "src")
    captioned = tmp_path / "captioned"  # a captioned dataset kept in subfolders stays captions
    shutil.copytree(src, captioned)
    for image in captioned.rglob("*.png"):
        image.with_suffix(".txt").write_text("a caption")
    assert pack.resolve_layout(str(captioned), "auto") == "captions"
    (src / "top.png").write_bytes(png_bytes())  # media at the top level: the captions layout
    assert pack.resolve_layout(str(src), "auto") == "captions"
    assert _run(pack, [str(src), str(tmp_path / "captions"), "--layout", "captions"]) == 0
    (packed,) = _members(tmp_path / "captions").values()  # mole0.png, the one image with a .txt
    assert json.loads(packed["json"])["source"] == str(src / "mole" / "mole0.png") and "cls" not in packed
    assert not (tmp_path / "captions" / CLASSES_FILE).exists()
    (src / "top.png").unlink()
    (src / "empty").mkdir()
    capsys.readouterr()
    assert _run(pack, [str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(src / "empty") in err and "no .jpg" in err


def test_synth_classes_writes_learnable_cls_shards(tmp_path, capsys):
    argv = ["--shards", "image", str(tmp_path), "--count", "10", "--per-shard", "4", "--classes", "7"]
    assert _run(synth_shards, argv) == 0
    names = read_classes(tmp_path)
    assert len(names) == 7 and len(set(names.values())) == 7
    samples = _members(tmp_path)
    assert all("txt" not in m and 0 <= int(m["cls"]) < 7 for m in samples.values())
    for m in samples.values():  # the class decides the shape and colour
        scene = json.loads(m["json"])
        assert names[int(m["cls"])] == f"{scene['colour']} {scene['shape']}"
    capsys.readouterr()
    assert _run(stats, [str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["labelled"] == 10
    assert _run(synth_shards, ["--shards", "video", str(tmp_path / "v"), "--classes", "3"]) == 2


def _tiny_dit_pipeline(folder: Path) -> None:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from dydit_scale.models.tiny import vae

    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, num_embeds_ada_norm=10, norm_num_groups=1)
    DiTPipeline(transformer=transformer, vae=vae(4, flux=False), scheduler=DDIMScheduler()).save_pretrained(folder)


@pytest.mark.slow
def test_encode_class_shards_with_a_dit_pipeline(tmp_path, capsys):
    _tiny_dit_pipeline(tmp_path / "dit")
    assert _run(synth_shards, ["--shards", "image", str(tmp_path / "img"), "--count", "6", "--per-shard", "3",
                               "--classes", "4"]) == 0
    argv = [str(tmp_path / "img"), str(tmp_path / "enc"), "--model", str(tmp_path / "dit"), "--resolution", "32",
            "--batch-size", "2"]
    assert _run(encode, argv) == 0
    source, encoded = _members(tmp_path / "img"), _members(tmp_path / "enc")
    assert set(encoded) == set(source)
    for key, members in encoded.items():
        assert set(members) == {"latent.npy", "cls", "json"} and members["cls"] == source[key]["cls"]
    assert read_classes(tmp_path / "enc") == read_classes(tmp_path / "img")
    cfg = DataConfig(shards=str(tmp_path / "enc"), batch_size=2, workers=0)
    batch = next(iter(build_loader(cfg, seed=0, rank=0, world_size=1)))
    assert batch["latents"].shape[:2] == (2, 4) and "text_embeds" not in batch
    assert batch["labels"].tolist() == [int(source[k.split("/")[1]]["cls"]) for k in batch["keys"]]

    assert _run(synth_shards, ["--shards", "image", str(tmp_path / "cap"), "--count", "2"]) == 0
    capsys.readouterr()
    assert _run(encode, [str(tmp_path / "cap"), str(tmp_path / "enc2"), "--model", str(tmp_path / "dit"),
                         "--resolution", "32"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dydit-data encode:")]
    assert "no text_encoder" in err and "captions" in err and str(tmp_path / "dit") in err
    assert not list((tmp_path / "enc2").glob("*.tar*"))
