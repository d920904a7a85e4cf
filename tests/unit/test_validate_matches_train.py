"""What `dydit-validate` passes, `dydit-train` accepts: both run the same start-up checks and refuse
the same recipes with the same one line naming the field; `--offline` keeps only the recipe's own
rules; overrides work both ways on both commands; a refused launch leaves no run folder behind."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from dydit_scale.cli import validate
from dydit_scale.config import RecipeError, load_recipe
from dydit_scale.train import entry, failure
from dydit_scale.train.recipe_checks import recipe_problems

REPO = Path(__file__).resolve().parents[2]
CLASSES = {"flux": ("FluxPipeline", "FluxTransformer2DModel"), "pixart": ("PixArtAlphaPipeline", "PixArtTransformer2DModel"),
           "dit": ("DiTPipeline", "DiTTransformer2DModel")}


def _pipeline(folder: Path, family: str = "flux", *, components: tuple[str, ...] = ("vae", "scheduler", "text_encoder")) -> Path:
    """A diffusers pipeline folder as far as the start-up checks look: no weights."""
    pipeline, transformer = CLASSES[family]
    index = {"_class_name": pipeline, "transformer": ["diffusers", transformer], "feature_extractor": [None, None],
             **{name: ["diffusers", "Something"] for name in ("vae", "scheduler", "text_encoder")}}
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in components:
        (folder / name).mkdir()
    return folder


def _shards(folder: Path, count: int = 2, per_shard: int = 8) -> Path:
    folder.mkdir(parents=True)
    names = [f"shard-{i:06d}.tar" for i in range(count)]
    for name in names:
        (folder / name).write_bytes(b"")
    (folder / "sizes.json").write_text(json.dumps({name: per_shard for name in names}))
    return folder


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A recipe that passes every check, run from `tmp_path` as a world of one."""
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    _pipeline(tmp_path / "flux")
    _pipeline(tmp_path / "pixart", "pixart")
    _pipeline(tmp_path / "dit", "dit")
    _shards(tmp_path / "shards")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: flux\ndata:\n  shards: shards\n  workers: 1\n  batch_size: 2\n"
                      "run:\n  output_dir: runs\n  name: r\n")
    return recipe


def _transformer_only(tmp: Path) -> str:
    (tmp / "t").mkdir()
    (tmp / "t" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    return "model.path=t"


def _unsupported(tmp: Path) -> str:
    _pipeline(tmp / "u")
    (tmp / "u" / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    return "model.path=u"


def _no_vae(tmp: Path) -> str:
    _pipeline(tmp / "novae", components=("scheduler", "text_encoder"))
    return "model.path=novae"


def _empty(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return "model.path=empty"


def _other_run(tmp: Path) -> str:
    step = tmp / "runs" / "r" / "checkpoints" / "step-0000001"
    step.mkdir(parents=True)
    (step / "dydit_state.json").write_text(json.dumps({"step": 1, "identity": {"family": "pixart"}}))
    return "checkpoint.resume=auto"


CASES = {
    "missing-model": (lambda tmp: "model.path=nowhere", "model.path: nowhere: no such folder"),
    "not-diffusers": (_empty, "model.path: empty: not a diffusers folder"),
    "transformer-only": (_transformer_only, "model.path: t: not a diffusers pipeline folder; expected model_index.json"),
    "wrong-family": (lambda tmp: "model.family=pixart", "model.path: flux: holds a flux transformer, but model.family is 'pixart'"),
    "unsupported-class": (_unsupported, "transformer class 'UNet2DConditionModel' is not supported"),
    "missing-component": (_no_vae, "model.path: novae: model_index.json lists vae, but there is no vae/ folder"),
    "reserved-deepspeed-key": (lambda tmp: "train.deepspeed={train_batch_size: 8}",
                               "train.deepspeed.train_batch_size: derived from the recipe; set data.batch_size"),
    "xformers-without-cuda": (lambda tmp: "model.attention=xformers", "model.attention: xformers needs CUDA"),
    "missing-shards": (lambda tmp: "data.shards=noshards", "data.shards: 'noshards' matches no shard file"),
    "batch-larger-than-data": (lambda tmp: "data.batch_size=64", "data.shards: 2 shard(s) hold 16 sample(s), fewer than one batch"),
    "fewer-shards-than-workers": (lambda tmp: "data.workers=3", "data.shards: 2 shard(s) cannot feed 1 rank(s) x 3 worker(s)"),
    "missing-val-shards": (lambda tmp: "data.val_shards=noval", "data.val_shards: 'noval' matches no shard file"),
    "resume-not-a-checkpoint": (lambda tmp: "checkpoint.resume=runs/r/checkpoints/step-0000001",
                                "checkpoint.resume: runs/r/checkpoints/step-0000001 is not a complete checkpoint"),
    "resume-of-another-model": (_other_run, "checkpoint.resume: runs/r/checkpoints/step-0000001 was trained with "
                                            "other settings; changed: base model weights (None -> 'sha256:"),
    "dit-prompt-not-a-class": (lambda tmp: "model.path=dit",  # with model.family=dit below
                               "validation.prompts: 'a red circle' is not a class index in 0..999"),
    "cache-leaves-no-block": (lambda tmp: f"model.path={_two_blocks(tmp)}",  # with validation.cache below
                              "validation.cache: fn 8 + bn 0 blocks always run, but transformer_blocks has 2"),
    "weighting-on-ddpm": (lambda tmp: "model.family=pixart",  # with model.path=pixart below
                          "train.timestep_weighting 'logit_normal' applies to flow matching (flux, sit) only"),
}


def _two_blocks(tmp: Path) -> Path:
    folder = _pipeline(tmp / "two", "flux")
    (folder / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "FluxTransformer2DModel", "num_layers": 2, "num_single_layers": 4}))
    return folder


def test_a_step_cache_on_latte_is_refused_offline_too(setup):
    latte = ["model.family=latte", "data.kind=video_text"]
    recipe = load_recipe(setup, [*latte, "validation.cache.mode=taylorseer"])
    assert recipe_problems(recipe, offline=True) == [
        "validation.cache.mode: latte: cache-dit cannot cache this family: its forward interleaves spatial and "
        "temporal blocks (transformer_blocks[i], then temporal_transformer_blocks[i]) in one loop, and cache-dit "
        "caches whole block lists"]
    assert recipe_problems(load_recipe(setup, latte), offline=True) == []  # mode none


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _as_train(lines: list[str], *, schema: bool = False) -> list[str]:
    """Validation's lines as training prints them: schema problems as they are; start-up problems
    joined into the one line of a failed rank, tagged with where it failed."""
    recipe = lines[0].split(": ", 1)[0]
    if schema:
        return lines
    return [f"{recipe}: {'; '.join(line.split(': ', 1)[1] for line in lines)} [rank 0, start-up]"]


@pytest.mark.parametrize("case", list(CASES))
def test_validate_and_train_refuse_the_same_recipe_with_the_same_line(setup, tmp_path, capsys, monkeypatch, case):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make, expected = CASES[case]
    overrides = [make(tmp_path)]
    if case == "weighting-on-ddpm":
        overrides += ["model.path=pixart", "train.timestep_weighting=logit_normal"]
    if case == "cache-leaves-no-block":
        overrides += ["validation.cache.mode=dbcache"]
    if case == "dit-prompt-not-a-class":
        overrides += ["model.family=dit", "validation.prompts=[a red circle]"]
    before = sorted(tmp_path.rglob("*"))
    assert validate([str(setup), *overrides]) == 2
    refused = _lines(capsys.readouterr().err)
    assert len(refused) == 1 and refused[0].startswith(f"{setup}: ") and expected in refused[0], refused
    assert entry.main([str(setup), *overrides]) == 2
    assert _lines(capsys.readouterr().err) == _as_train(refused, schema=case == "weighting-on-ddpm")
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, nothing written


def test_a_recipe_that_validates_has_no_start_up_problem(setup, capsys):
    assert validate([str(setup)]) == 0
    assert "1 recipe(s) valid" in capsys.readouterr().out
    assert recipe_problems(load_recipe(setup)) == []


def test_world_size_counts_for_validate_as_for_train(setup, capsys, monkeypatch):
    assert validate([str(setup), "data.batch_size=8"]) == 0
    assert validate([str(setup), "data.batch_size=8", "--world-size", "4"]) == 2
    refused = _lines(capsys.readouterr().err)
    assert refused == [f"{setup}: data.shards: 2 shard(s) cannot feed 4 rank(s) x 1 worker(s); need at least 4 "
                       "(repack with a smaller `dydit-data pack --max-count`, or lower data.workers)"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert entry.main([str(setup), "data.batch_size=8"]) == 2
    assert _lines(capsys.readouterr().err) == _as_train(refused)


def test_offline_skips_what_depends_on_this_machine_but_not_the_recipe_rules(setup, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elsewhere = ["model.path=/models/FLUX.1-dev", "data.shards=/data/shards", "model.attention=xformers",
                 "checkpoint.resume=/runs/x/checkpoints/step-0000010"]
    assert validate([str(setup), *elsewhere]) == 2
    assert len(_lines(capsys.readouterr().err)) == 4
    assert validate([str(setup), *elsewhere, "--offline"]) == 0
    assert "(offline: files, shards and CUDA not checked)" in capsys.readouterr().out
    assert validate([str(setup), *elsewhere, "--offline", "train.deepspeed={gradient_clipping: 0.5}"]) == 2
    assert _lines(capsys.readouterr().err) == [
        f"{setup}: train.deepspeed.gradient_clipping: derived from the recipe; set optim.max_grad_norm instead"]
    assert validate([str(setup), *elsewhere, "--offline", "data.batch_size=0"]) == 2
    assert "data.batch_size: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_every_shipped_recipe_passes_offline():
    recipes = sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))
    assert validate(["--offline", *recipes]) == 0


@pytest.mark.parametrize("argv", [
    ["{r}", "optim.lr=5e-5", "--set", "train.steps=7"],
    ["--set", "train.steps=7", "{r}", "optim.lr=5e-5"],
    ["{r}", "--set", "optim.lr=5e-5", "train.steps=7"],
], ids=["positional-then-set", "set-first", "set-between"])
def test_both_override_syntaxes_on_validate_and_train(setup, capsys, argv):
    argv = [a.replace("{r}", str(setup)) for a in argv]
    assert validate([*argv, "--print"]) == 0
    shown = capsys.readouterr().out
    assert "lr: 5.0e-05" in shown and "steps: 7" in shown
    refused = [*argv, "model.path=nowhere", "--set", "data.shards=noshards"]  # train stops at the checks
    assert entry.main(refused) == 2
    err = _lines(capsys.readouterr().err)
    assert validate(refused) == 2
    shown = _lines(capsys.readouterr().err)
    assert len(shown) == 2 and "model.path: nowhere" in shown[0] and "data.shards: 'noshards'" in shown[1]
    assert err == _as_train(shown)


def test_train_takes_exactly_one_recipe(setup, capsys):
    with pytest.raises(SystemExit) as exit_:
        entry.main([str(setup), str(setup)])
    assert exit_.value.code == 2 and "expected one RECIPE" in capsys.readouterr().err


def _failing_trainer(monkeypatch, files: dict[str, str]):
    """Trainer stand-in that writes `files` into the run folder, then fails its start-up; the hard
    exit of a failed rank becomes SystemExit."""
    class Trainer:
        def __init__(self, recipe):
            run_dir = Path(recipe.run.output_dir) / recipe.run.name
            for name, text in files.items():
                (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (run_dir / name).write_text(text)
            raise RecipeError(["refused late"])

    def exit_now(code: int = 2):
        raise SystemExit(code)

    monkeypatch.setitem(sys.modules, "dydit_scale.train.loop", types.SimpleNamespace(Trainer=Trainer))
    monkeypatch.setattr(failure, "exit_within", lambda *args, **kwargs: None)
    monkeypatch.setattr(failure, "exit_now", exit_now)


def test_a_launch_refused_at_start_up_takes_back_the_run_folder_it_created(setup, tmp_path, capsys, monkeypatch):
    _failing_trainer(monkeypatch, {"recipe.yaml": "x", "tb/events": "", "metrics.jsonl": ""})
    with pytest.raises(SystemExit) as exit_:
        entry.main([str(setup)])
    assert exit_.value.code == 2
    assert f"{setup}: refused late [rank 0, start-up]" in capsys.readouterr().err
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "runs" / "r").exists()


def test_a_refused_relaunch_keeps_the_existing_run_folder_and_its_files(setup, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("earlier")
    _failing_trainer(monkeypatch, {"env.json": "{}"})
    with pytest.raises(SystemExit):
        entry.main([str(setup)])
    assert (run / "recipe.yaml").read_text() == "earlier" and (run / "checkpoints").is_dir()


def test_explain_lists_allowed_values_and_cites_no_documents(capsys):
    assert validate(["--explain"]) == 0
    text = capsys.readouterr().out
    assert "model.family (default: 'flux'; one of flux | pixart | latte | dit | sit)" in text
    assert "train.zero_stage (default: 2; one of 0 | 1 | 2 | 3)" in text
    assert "model.path (required)" in text
    assert re.search(r"§|\bspec\b|architecture|stack\.md|method\.md", text, re.IGNORECASE) is None


@pytest.mark.parametrize("command, argv, shown", [
    (validate, ["--help"], "ranks the run will use (the shards must feed every rank and data worker) (default: 1)"),
    (entry.main, ["--help"], "usage: dydit-train [-h] RECIPE [KEY=VALUE ...] [--set KEY=VALUE ...]"),
    ("data_tools", ["pack", "--help"], "samples per shard at most (default: 1000)"),
], ids=["validate", "train", "data-pack"])
def test_help_shows_defaults(command, argv, shown, capsys):
    if command == "data_tools":
        from data_tools.cli import main as command
    with pytest.raises(SystemExit):
        command(argv)
    assert shown in " ".join(capsys.readouterr().out.split())
