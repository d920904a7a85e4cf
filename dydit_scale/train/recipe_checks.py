"""Every start-up rule a recipe must pass, in one place: `dydit-validate` and `dydit-train` both
call `load_checked_recipe`, so what validation accepts, training accepts.

The schema (`config.load_recipe`) checks what the YAML alone decides. The rules here need more:
the DeepSpeed keys the recipe derives itself, and, unless `offline`, this machine: the model folder,
the validation prompts, the shards, the attention kernel, and the checkpoint a relaunch would
resume. Each problem is one line naming the field. The offline rules never import torch.
"""

from __future__ import annotations

from pathlib import Path

from dydit_scale.config import DataConfig, ModelConfig, Recipe, RecipeError, load_recipe
from dydit_scale.train.ds_config import derived_key_conflicts

__all__ = ["load_checked_recipe", "recipe_problems"]


def load_checked_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, world_size: int = 1,
                        offline: bool = False) -> Recipe:
    """`load_recipe` plus `recipe_problems`; raises RecipeError, one line per problem, prefixed with `path`."""
    recipe = load_recipe(path, overrides)
    problems = recipe_problems(recipe, world_size=world_size, offline=offline)
    if problems:
        raise RecipeError([f"{path}: {line}" for line in problems])
    return recipe


def recipe_problems(recipe: Recipe, *, world_size: int = 1, offline: bool = False) -> list[str]:
    """Why training would refuse `recipe` at start-up on `world_size` ranks; `offline` skips every
    rule that depends on this machine (files, CUDA), for a recipe meant for another one."""
    problems = derived_key_conflicts(recipe.train.deepspeed) + _cache_family_problems(recipe)
    if offline:
        return problems
    model = _model_problems(recipe.model)
    problems += model + ([] if model else _prompt_problems(recipe) + _cache_problems(recipe))
    problems += _attention_problems(recipe.model.attention) + _data_problems(recipe.data, world_size)
    return problems + _resume_problems(recipe, compare_model=not model)


def _model_problems(model: ModelConfig) -> list[str]:
    """Training loads the transformer of `model.family` and the pipeline's VAE and text encoders."""
    from dydit_scale.models.loading import ModelFolderError, detect_family, pipeline_folder

    try:
        detect_family(model.path, expected=model.family)
        pipeline_folder(model.path)
    except ModelFolderError as err:
        return [f"model.path: {err}"]
    return []


def _prompt_problems(recipe: Recipe) -> list[str]:
    """The sample grid's prompts must mean something to the family (dit: a class index or a name of
    the pipeline's `id2label`), so a bad one fails now, not at the first grid hours later."""
    import json
    from types import SimpleNamespace

    from dydit_scale.models.registry import get_family

    index = json.loads((Path(recipe.model.path) / "model_index.json").read_text())
    labels = {name.strip(): int(key) for key, names in (index.get("id2label") or {}).items()
              for name in names.split(",")}  # as DiTPipeline reads its id2label
    family, problems = get_family(recipe.model.family), []
    for prompt in recipe.validation.prompts:
        try:
            family.prompt_arguments(SimpleNamespace(labels=labels), prompt)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _cache_family_problems(recipe: Recipe) -> list[str]:
    if recipe.validation.cache.mode == "none":
        return []
    from dydit_scale.infer.step_cache import family_problem

    problem = family_problem(recipe.model.family)
    return [] if problem is None else [f"validation.cache.mode: {problem}"]


def _cache_problems(recipe: Recipe) -> list[str]:
    """dydit-sample's default step cache must fit the model's blocks (whether cache-dit is installed is
    dydit-sample's concern: training never uses it)."""
    import json

    from dydit_scale.infer.step_cache import block_counts, cache_problem
    from dydit_scale.models.loading import transformer_folder

    cache = recipe.validation.cache
    if cache.mode == "none" or _cache_family_problems(recipe):
        return []
    config = json.loads((transformer_folder(recipe.model.path) / "config.json").read_text())
    problem = cache_problem(recipe.model.family, block_counts(recipe.model.family, config), cache)
    return [] if problem is None else [f"validation.cache: {problem}"]


def _attention_problems(kind: str) -> list[str]:
    if kind == "sdpa":
        return []
    from dydit_scale.models.build import attention_problem

    problem = attention_problem(kind)
    return [] if problem is None else [problem]


def _data_problems(data: DataConfig, world_size: int) -> list[str]:
    """The loader's own rules for `data.shards` and, when set, `data.val_shards`."""
    from dydit_scale.data.format import DataFormatError, expand_shard_spec
    from dydit_scale.data.shards import check_enough_samples, check_enough_shards

    problems = []
    for where, spec in (("data.shards", data.shards), ("data.val_shards", data.val_shards)):
        if spec is None:
            continue
        try:
            urls = expand_shard_spec(spec, where=where)
            check_enough_shards(len(urls), world_size=world_size, num_workers=max(1, data.workers), where=where)
            total = _samples_up_to(urls, world_size * data.batch_size)
            check_enough_samples(total, num_shards=len(urls), world_size=world_size, batch_size=data.batch_size,
                                 where=where)
        except DataFormatError as err:
            problems.append(str(err))
    return problems


def _samples_up_to(urls: list[str], needed: int) -> int:
    """Samples in `urls` from sizes.json, counting unlisted shards only until `needed` is reached
    (the total is exact whenever it is below `needed`)."""
    from dydit_scale.data.format import shard_sizes
    from dydit_scale.data.shards import count_samples

    sizes = shard_sizes(urls)
    total = sum(n for n in sizes if n is not None)
    for url, size in zip(urls, sizes):
        if total >= needed:
            break
        if size is None:
            total += count_samples(url)
    return total


def _resume_problems(recipe: Recipe, *, compare_model: bool) -> list[str]:
    """A relaunch must resume from a complete checkpoint of the same model, layout and objective
    (compared only with a readable model folder, since the base weights are part of it)."""
    checkpoints = Path(recipe.run.output_dir) / recipe.run.name / "checkpoints"
    resume = recipe.checkpoint.resume
    if resume == "never" or (resume == "auto" and not checkpoints.is_dir()):
        return []
    from dydit_scale.models.registry import get_family
    from dydit_scale.train import checkpoint
    from dydit_scale.train.identity import check_resume, run_identity

    try:
        folder = checkpoint.resolve_resume(resume, checkpoints)
        if folder is not None and compare_model:
            identity = run_identity(recipe, get_family(recipe.model.family).objective)
            check_resume(checkpoint.read_marker(folder), identity, folder)
    except RecipeError as err:
        return err.lines
    return []
