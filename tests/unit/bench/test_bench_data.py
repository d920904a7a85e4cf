"""`dydit-bench data` runs both loaders on the same synthetic shards and reports JSON (no speed asserted);
its bare webdataset loader does not unpickle `.pyd` members."""

from __future__ import annotations

import argparse
import io
import json
import pickle
import tarfile
from pathlib import Path

from dydit_scale.bench import data as bench_data


def test_bench_data_json_reports_both_loaders_for_images_and_videos(capsys):
    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    args = parser.parse_args(["--json", "--count", "32", "--batch-size", "4", "--workers", "0",
                              "--resolution", "64", "--num-frames", "4", "--repeats", "1"])
    assert bench_data.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"image", "video"}
    for row in report.values():
        assert row["ours_samples_per_s"] > 0 and row["webdataset_samples_per_s"] > 0 and row["ratio"] > 0


class _Touch:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_bench_bare_loader_does_not_unpickle_pyd_members(tmp_path):
    from PIL import Image

    marker, image = tmp_path / "marker", io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image, format="PNG")
    members = {"png": image.getvalue(), "txt": b"a red circle", "pyd": pickle.dumps(_Touch(marker)),
               "pickle": pickle.dumps(_Touch(marker))}
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for index in range(4):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{index:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    args = argparse.Namespace(resolution=16, num_frames=8, shuffle_buffer=0, batch_size=2, workers=0)
    batches = list(bench_data._bare_loader([str(tmp_path / "shard.tar")], "image", args))
    assert [tuple(b[0].shape) for b in batches] == [(2, 3, 16, 16)] * 2
    assert batches[0][1] == ["a red circle"] * 2
    assert not marker.exists(), "the .pyd member was unpickled"
