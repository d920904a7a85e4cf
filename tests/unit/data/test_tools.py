"""`dydit-data` subcommands, called through their own parsers: validate, pack, stats, synth, encode."""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pytest
from shard_fixtures import png_bytes

from data_tools import encode, pack, stats, synth_shards, validate
from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader
from dydit_scale.data.format import read_sizes


def _run(module, argv: list[str], *, add=None, run=None) -> int:
    parser = argparse.ArgumentParser()
    (add or module.add_arguments)(parser)
    return (run or module.run)(parser.parse_args(argv))


def _keys(folder: Path) -> dict[str, list[str]]:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            out[tar.name] = sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
    return out


def test_validate_json_reports_every_reason_per_shard(bad_image_shards, tmp_path, capsys):
    quarantine = tmp_path / "bad.tsv"
    code = _run(validate, [str(bad_image_shards), "--json", "--min-side", "16", "--quarantine", str(quarantine)])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["samples"] == 12 + 7 + 4
    assert report["bad"] == {"corrupt_tar": 1, "decode_error": 2, "missing_caption": 1, "missing_media": 1,
                             "too_small": 1}
    shards = {Path(p).name: r for p, r in report["shards"].items()}
    assert shards["shard-000000.tar"] == {"samples": 12, "bad": {}}
    assert shards["shard-000002.tar"]["sizes_json"] == 6  # sizes.json says 6, the tar holds 4
    lines = quarantine.read_text().splitlines()
    assert len(lines) == 6 and any("\tnocaption\tmissing_caption\t" in line for line in lines)


def test_validate_clean_shards_exit_0(clean_image_shards, capsys):
    assert _run(validate, [str(clean_image_shards), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bad"] == {}


def test_validate_frames_counts_short_clips(tmp_path, capsys):
    synth = ["--shards", "video", str(tmp_path / "v"), "--count", "2", "--frames", "6"]
    assert _run(synth_shards, synth, add=synth_shards.add_shard_arguments, run=synth_shards.run_shards) == 0
    assert _run(validate, [str(tmp_path / "v"), "--json", "--frames", "8"]) == 1
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["bad"] == {"video_too_short": 2}
    assert _run(validate, [str(tmp_path / "v"), "--json", "--frames", "6"]) == 0


def test_validate_unknown_spec_is_exit_2(tmp_path, capsys):
    assert _run(validate, [str(tmp_path / "none-*.tar")]) == 2
    assert "matches no shard file" in capsys.readouterr().err


def _image_folder(root: Path, count: int) -> Path:
    root.mkdir()
    for i in range(count):
        (root / f"img{i:02d}.png").write_bytes(png_bytes((40, 40), (i * 20, 0, 0)))
        if i != 4:  # one image without its caption
            (root / f"img{i:02d}.txt").write_text(f"a red square number {i}")
    return root


class _Interrupt(Exception):
    pass


def _interrupted_pack(monkeypatch, argv: list[str], at: int) -> None:
    """Run `pack` with `argv` until it reaches sample `at`, as if the process were killed there."""
    original = pack._sample

    def failing(index, entry, data):
        if index == at:
            raise _Interrupt
        return original(index, entry, data)

    monkeypatch.setattr(pack, "_sample", failing)
    with pytest.raises(_Interrupt):
        _run(pack, argv)
    monkeypatch.setattr(pack, "_sample", original)


def test_pack_resumes_after_an_interruption_without_duplicates(tmp_path, monkeypatch):
    src = _image_folder(tmp_path / "src", 11)
    assert _run(pack, [str(src), str(tmp_path / "clean"), "--max-count", "3"]) == 0
    _interrupted_pack(monkeypatch, [str(src), str(tmp_path / "resumed"), "--max-count", "3"], at=8)
    assert len(_keys(tmp_path / "resumed")) == 2  # two whole shards; the third stayed .partial
    assert (tmp_path / "resumed" / pack.PROGRESS_FILE).is_file()
    assert _run(pack, [str(src), str(tmp_path / "resumed"), "--max-count", "3"]) == 0
    assert _keys(tmp_path / "resumed") == _keys(tmp_path / "clean")
    assert read_sizes(tmp_path / "resumed") == read_sizes(tmp_path / "clean") == {
        "shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 3, "shard-000003.tar": 1}
    assert not list((tmp_path / "resumed").glob("*.partial"))
    assert not (tmp_path / "resumed" / pack.PROGRESS_FILE).exists()  # finished: no resume state left behind


def test_pack_refuses_to_pack_again_into_a_finished_folder(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", 3)
    assert _run(pack, [str(src), str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / pack.PROGRESS_FILE).exists()
    assert _run(pack, [str(src), str(tmp_path / "out")]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_pack_leaves_out_corrupt_images_naming_each_original_file(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", 6)  # img04 has no caption
    (src / "img01.png").write_bytes(b"not an image at all")
    (src / "img02.png").write_bytes(png_bytes((40, 40))[:70])  # truncated inside the pixel data
    assert _run(pack, [str(src), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "left out" in line]
    assert [line.split(": ")[1] for line in lines] == [str(src / f"img0{i}.png") for i in (1, 2, 4)]
    assert all("undecodable image" in line for line in lines[:2]) and "no caption" in lines[2]
    assert "BytesIO" not in err and "000000001" not in err  # neither a repr nor the shard key
    assert "2 item(s) with an undecodable image left out" in out and "1 item(s) without a caption" in out
    assert read_sizes(tmp_path / "out") == {"shard-000000.tar": 3}
    assert _run(validate, [str(tmp_path / "out"), "--json"]) == 0
    assert not (tmp_path / "out" / pack.PROGRESS_FILE).exists()


def test_pack_manifest_names_the_listed_file(tmp_path, capsys):
    _image_folder(tmp_path / "src", 2)
    (tmp_path / "src" / "img01.png").write_bytes(b"garbage")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": f"src/img0{i}.png", "caption": "c"}) + "\n"
                                              for i in range(3)))
    assert _run(pack, [str(tmp_path / "m.jsonl"), str(tmp_path / "out")]) == 2  # img02.png does not exist
    err = capsys.readouterr().err
    assert f"{tmp_path / 'src' / 'img01.png'}: undecodable image" in err
    missing = tmp_path / "src" / "img02.png"
    assert err.splitlines()[-1] == f"dydit-data pack: {missing}: cannot read it (No such file or directory)"


def test_pack_bad_caption_is_one_line_naming_the_txt(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", 2)
    (src / "img01.txt").write_bytes(b"caf\xe9")
    assert _run(pack, [str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dydit-data pack: {src / 'img01.txt'}: expected a UTF-8 caption") and "\n" not in err


def test_pack_csv_manifest_then_validate(tmp_path, capsys):
    src = _image_folder(tmp_path / "src", 4)
    rows = "path,caption,licence\n" + "".join(f"src/img{i:02d}.png,caption {i},cc0\n" for i in range(4))
    (tmp_path / "m.csv").write_text(rows)
    assert _run(pack, [str(tmp_path / "m.csv"), str(tmp_path / "out")]) == 0
    assert _run(validate, [str(tmp_path / "out"), "--json"]) == 0
    assert "licence" in (tmp_path / "out" / "shard-000000.tar").read_bytes().decode("latin-1")
    del src


def test_pack_refuses_to_resume_with_other_input(tmp_path, monkeypatch, capsys):
    src = _image_folder(tmp_path / "src", 5)
    _interrupted_pack(monkeypatch, [str(src), str(tmp_path / "out"), "--max-count", "2"], at=3)
    assert _run(pack, [str(src), str(tmp_path / "out"), "--max-count", "1"]) == 2
    assert "other input or options" in capsys.readouterr().err


def test_stats_counts_and_writes_sizes(clean_image_shards, tmp_path, capsys):
    copy = tmp_path / "copy.tar"
    copy.write_bytes((clean_image_shards / "shard-000000.tar").read_bytes())
    assert _run(stats, [str(copy), "--json", "--write-sizes"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["samples"] == 9 and report["total"]["kinds"] == {"image": 9}
    assert read_sizes(tmp_path) == {"copy.tar": 9}
    shard = report["shards"][str(copy)]
    assert shard["width"]["min"] == 32 and shard["width"]["max"] == 48


def test_stats_table_is_aligned_text_without_reprs(bad_image_shards, capsys):
    assert _run(stats, [str(bad_image_shards)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(c in line for line in lines for c in "{}[]'")
    assert lines[0].split()[:3] == ["shard", "samples", "MB"]
    end = lines[0].index("samples") + len("samples")  # counts are right-aligned under their header
    assert all(line[end - 1].isdigit() and line[end] == " " for line in lines[1:])
    assert lines[-1].split()[:2] == ["total", "23"] and "without media" in lines[-1]
    assert "corrupt" in next(line for line in lines if line.startswith("shard-000002.tar"))


def test_synth_image_shards_load(tmp_path):
    argv = ["--shards", "image", str(tmp_path), "--count", "10", "--per-shard", "4"]
    assert _run(synth_shards, argv) == 0
    assert read_sizes(tmp_path) == {"shard-000000.tar": 4, "shard-000001.tar": 4, "shard-000002.tar": 2}
    batch = next(iter(build_loader(DataConfig(shards=str(tmp_path), resolution=64, batch_size=2, workers=0),
                                   seed=0, rank=0, world_size=1)))
    assert all(c.startswith("a ") and " at the " in c for c in batch["captions"])


@pytest.mark.slow
def test_encode_writes_pre_encoded_shards_and_resumes(tmp_path, capsys):
    from dydit_scale.models.tiny import write_tiny_pipeline

    write_tiny_pipeline("flux", str(tmp_path / "flux"))
    assert _run(synth_shards, ["--shards", "image", str(tmp_path / "img"), "--count", "6", "--per-shard", "3"]) == 0
    argv = [str(tmp_path / "img"), str(tmp_path / "enc"), "--model", str(tmp_path / "flux"), "--resolution", "64",
            "--batch-size", "2", "--max-text-tokens", "8"]
    assert _run(encode, argv) == 0
    assert read_sizes(tmp_path / "enc") == {"shard-000000.tar": 3, "shard-000001.tar": 3}
    batch = next(iter(build_loader(DataConfig(shards=str(tmp_path / "enc"), batch_size=2, workers=0),
                                   seed=0, rank=0, world_size=1)))
    assert batch["latents"].shape[:2] == (2, 4) and batch["text_embeds"].shape == (2, 8, 32)
    assert batch["pooled_embeds"].shape == (2, 32) and batch["text_mask"].shape == (2, 8)
    capsys.readouterr()
    assert _run(encode, argv) == 0
    assert "2 already done" in capsys.readouterr().out
