"""The recipe: one typed schema for every run, loaded from YAML and validated at load time.

A recipe is a complete YAML file (no inheritance) with the sections below. `load_recipe` applies
`a.b=c` command-line overrides, validates, and reports *every* problem at once, one line each, in the
user's own key names (``recipes/x.yaml: data.batch_size: expected an integer >= 1, got 0``).
Only this module imports pydantic; it never imports torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_fields", "recipe_choices", "split_overrides",
           "DynamicConfig"]


class RecipeError(ValueError):
    """A recipe that cannot be used; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    name: str = "run"
    """Run name; the run folder is `output_dir/name`."""
    output_dir: str = "runs"
    """Folder that holds run folders (must be on a shared filesystem for multi-node runs)."""
    seed: int = 0
    """Global seed: model init of new modules, timestep/noise sampling, data order."""


class ModelConfig(_Section):
    family: Literal["flux", "pixart", "latte", "dit", "sit"] = "flux"
    """Model family: flux (DyFLUX, flow matching) | pixart (DyPixArt-α, DDPM) | latte (DyLatte, video) | dit (DyDiT, class-conditional DDPM on ImageNet-style .cls shards) | sit (DySiT: the DiT transformer trained with class-conditional flow matching)."""
    path: str
    """Required. Local diffusers folder: a whole pipeline (model_index.json); export and sampling also take a transformer folder (config.json). Never downloaded."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Training precision of the transformer (routers, FLOPs ratio and losses stay fp32)."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernel for training and sampling; xformers needs CUDA and the `gpu` extra."""


class DynamicConfig(_Section):
    """The `dynamic:` section: how the transformer is made dynamic (timestep-wise dynamic width + spatial-wise dynamic tokens)."""

    target_flops_ratio: float = Field(0.7, gt=0.0, le=1.0)
    """λ in Eq. (6): the FLOPs budget, as a fraction of the static model's attention+MLP MACs."""
    heads: bool = True
    """TDW over attention heads (Timestep-wise Dynamic Width)."""
    mlp_groups: int | None = Field(None, ge=1)
    """TDW channel groups per MLP; unset = one group per attention head (the paper's G = H)."""
    tokens: bool = True
    """SDT: a token router before each MLP lets easy patches skip it (Spatial-wise Dynamic Token)."""
    tau: float = Field(5.0, gt=0.0)
    """Gumbel-sigmoid temperature τ; only scales the straight-through gradient."""
    head_router_bias: float = 15.0
    """Initial bias of head and channel-group routers; σ(15)≈1 starts from the full network."""
    token_router_bias: float = 35.0
    """Initial output bias of DiT-style token routers (PixArt, Latte)."""
    flux_token_router_bias: float = 35.0
    """Initial output bias of DyFLUX token routers. The official 5 drops ~0.7 % of a fresh model's tokens in training (noise is bounded by 16.6), so we start from the full network like the DiT routers."""
    cross_attention: bool = False
    """PixArt/Latte: make cross-attention heads dynamic too (static by default)."""
    text_mlp: bool = False
    """FLUX: make the text-stream FFN width-dynamic too (static by default)."""
    importance_norm: Literal["l1", "l2", "none"] = "l1"
    """Norm of the magnitude criterion used to rank heads and MLP channels before fine-tuning; none keeps the loaded order (weights already ranked, as in the released DyDiT checkpoints, whose head 0 and group 0 are the always-on ones)."""
    flops_loss_weight: float = Field(2.0, ge=0.0)
    """w in w·(mean_b r_b − λ_eff)² (the official code uses 2, the paper 1)."""
    target_warmup_steps: int = Field(1000, ge=0)
    """K: λ_eff falls linearly from 1 to λ over K steps."""
    target_hold_steps: int = Field(100, ge=0)
    """Steps at λ_eff = 1 before the linear warm-up starts."""
    complete_warmup_steps: int = Field(0, ge=0)
    """Steps that add the complete-model loss term (same weights, every router bypassed)."""
    router_lr_scale: float = Field(1.0, gt=0.0)
    """Learning-rate multiplier of router parameters relative to optim.lr."""


class LoraConfig(_Section):
    kind: Literal["none", "lora", "td_lora"] = "td_lora"
    """none = full fine-tuning | lora = plain LoRA (peft) | td_lora = timestep-gated LoRA experts."""
    rank: int = Field(8, ge=1)
    """LoRA rank; for td_lora the total rank over all experts (each expert has rank/groups)."""
    alpha: float = Field(8.0, gt=0.0)
    """LoRA scale numerator: the update is (alpha/rank)·B·A."""
    groups: int = Field(4, ge=1)
    """td_lora: number of experts E mixed by a softmax gate on the timestep embedding."""
    targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    )
    """Module-name suffixes to adapt; a target that matches nothing is an error."""

    @model_validator(mode="after")
    def _rank_splits_into_groups(self) -> LoraConfig:
        if self.kind == "td_lora" and self.rank % self.groups:
            raise ValueError(
                f"lora.rank ({self.rank}) must be divisible by lora.groups ({self.groups}) for td_lora"
            )
        if self.kind != "none" and not self.targets:
            raise ValueError("lora.targets: expected at least one module name")
        return self


class DataConfig(_Section):
    kind: Literal["image_text", "video_text"] = "image_text"
    """Shard content: image_text (.jpg|.png|.webp + .txt) | video_text (.mp4 + .txt)."""
    shards: str | list[str]
    """Required. A folder (its *.tar), a brace pattern, a glob, or a list of those."""
    resolution: int = Field(256, ge=8)
    """Target image side in pixels (aspect-ratio buckets keep about resolution² pixels)."""
    batch_size: int = Field(4, ge=1)
    """Samples per rank per micro-step."""
    workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = Field(1000, ge=0)
    """Sample shuffle buffer per worker (0 = no sample shuffle)."""
    num_frames: int = Field(16, ge=1)
    """video_text: frames per clip (must equal the Latte model's video_length)."""
    frame_stride: int = Field(1, ge=1)
    """video_text: take every n-th frame."""
    max_text_tokens: int = Field(64, ge=1)
    """Caption tokens fed to the text encoder (padded/truncated)."""
    resume_policy: Literal["exact", "reshuffle"] = "exact"
    """On resume at another world size: exact = refuse with an error | reshuffle = warn and restart the epoch order."""
    val_shards: str | list[str] | None = None
    """Held-out shards for the periodic validation loss (same forms as `shards`)."""


class OptimConfig(_Section):
    lr: float = Field(1.0e-4, gt=0.0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after the warm-up."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Gradient clipping norm (0 = no clipping)."""


class TrainConfig(_Section):
    steps: int = Field(1000, ge=1)
    """Optimizer steps."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """ZeRO-3 only: keep parameters in CPU memory."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (non-reentrant)."""
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """EMA decay of trainable weights (0 = no EMA; the paper uses 0.9999)."""
    timestep_weighting: Literal["none", "logit_normal", "mode", "cosmap"] = "none"
    """FLUX flow matching: timestep density/weighting, as in diffusers' FLUX training."""
    guidance: float = Field(3.5, ge=0.0)
    """FLUX with a guidance embedding (guidance-distilled FLUX.1-dev): the value fed to it during training (diffusers' FLUX DreamBooth scripts default to 3.5, some trainers use 1); models without one (FLUX.1-schnell, PixArt, Latte) ignore it. Sampling uses validation.guidance_scale."""
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Extra DeepSpeed config keys; keys derived from the recipe (batch sizes, clipping, precision, ZeRO stage) are rejected."""

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"train.offload_params needs train.zero_stage 3, got {self.zero_stage}")
        return self


class CheckpointConfig(_Section):
    every_steps: int = Field(1000, ge=1)
    """Save a checkpoint every n optimizer steps (and at the end)."""
    keep: int = Field(3, ge=1)
    """Complete checkpoints to keep; older ones are pruned."""
    resume: str = "auto"
    """auto = newest complete checkpoint of this run | never | a path to a step folder."""
    universal: bool = False
    """Resume through DeepSpeed's universal checkpoint (needed when the world size changed)."""


class LogConfig(_Section):
    every_steps: int = Field(10, ge=1)
    """Console/TensorBoard logging cadence (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files under the run folder."""
    sample_every_steps: int | None = Field(None, ge=1)
    """Sample-grid cadence in steps (and at the last step); unset = validation.every_steps. The held-out loss keeps validation.every_steps."""
    sample_ledger: bool = False
    """Record every consumed sample key per step and rank in `ledger/rank-R.jsonl` (proves no repeats or gaps across resumes)."""
    verbose: bool = False
    """Show third-party console noise too (torchvision probes, diffusers' experimental-API notes, every caption truncation, DeepSpeed INFO)."""


class StepCacheConfig(_Section):
    mode: Literal["none", "dbcache", "taylorseer"] = "none"
    """cache-dit step cache on the fast path: dbcache reuses the middle blocks' residual on steps whose first blocks barely changed; taylorseer also extrapolates it (needs the `cache` extra)."""
    threshold: float = Field(0.08, gt=0.0)
    """Relative L1 change of the first blocks' output below which a step reuses the cache (higher: faster, less exact)."""
    fn: int = Field(8, ge=1)
    """Blocks at the start of the model that every step computes; how much their output changed decides whether a step is reused."""
    bn: int = Field(0, ge=0)
    """Blocks at the end of the model that every step computes (they correct the reused residual)."""
    warmup: int = Field(8, ge=0)
    """Sampler steps at the start that are never cached."""


class ValidationConfig(_Section):
    every_steps: int = Field(1000, ge=1)
    """Held-out loss (dynamic and full width) and sample grid every n steps."""
    batches: int = Field(2, ge=1)
    """Held-out batches per validation."""
    prompts: list[str] = Field(default_factory=lambda: ["a red circle", "a blue square"])
    """Fixed prompts of the sample grid (dit: class indices such as "207", or class names the pipeline knows)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    """Fixed seeds of the sample grid (one row per seed)."""
    inference_steps: int = Field(20, ge=1)
    """Sampler steps for the grid."""
    guidance_scale: float = Field(3.5, ge=0.0)
    """Guidance for the grid (FLUX: distilled guidance; PixArt/Latte/DiT: CFG)."""
    cache: StepCacheConfig = Field(default_factory=StepCacheConfig)
    """Step cache `dydit-sample` uses unless told otherwise; the training grids sample uncached, to show what training changes."""


class Recipe(_Section):
    """A complete run description."""

    run: RunConfig = Field(default_factory=RunConfig)
    """Run identity and output folder."""
    model: ModelConfig
    """Which diffusers model to start from (`model.path` is required)."""
    dynamic: DynamicConfig = Field(default_factory=DynamicConfig)
    """How the model is made dynamic."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Parameter-efficient fine-tuning."""
    data: DataConfig
    """Training data (`data.shards` is required)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Loop length, precision and DeepSpeed settings."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence and resume."""
    log: LogConfig = Field(default_factory=LogConfig)
    """Logging."""
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    """Held-out loss and sample grids."""

    @model_validator(mode="after")
    def _cross_section(self) -> Recipe:
        if (self.data.kind == "video_text") != (self.model.family == "latte"):
            raise ValueError(
                f"data.kind {self.data.kind!r} does not fit model.family {self.model.family!r}: "
                "video_text goes with latte, image_text with flux, pixart, dit or sit"
            )
        if self.train.timestep_weighting != "none" and self.model.family not in ("flux", "sit"):
            raise ValueError(
                f"train.timestep_weighting {self.train.timestep_weighting!r} applies to flow matching (flux, sit) only; "
                f"use none for model.family {self.model.family!r}"
            )
        if self.model.family == "pixart" and self.validation.inference_steps == 1:
            raise ValueError("validation.inference_steps: PixArtAlphaPipeline takes 1 step for an LCM sampler and "
                             "fails with any other; use 2 or more")
        if len(self.validation.seeds) < 1 or len(self.validation.prompts) < 1:
            raise ValueError("validation.prompts and validation.seeds: expected at least one each")
        return self


def recipe_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf field as (dotted name, docstring, default), for `dydit-validate --explain`; the
    default of a required field is `...`."""
    rows = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            rows.extend(recipe_fields(sub, dotted + "."))
        else:
            default = ... if field.is_required() else field.get_default(call_default_factory=True)
            rows.append((dotted, field.description or "", default))
    return rows


def recipe_choices(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    """The allowed values of every enumerated (Literal) leaf field, by dotted name."""
    choices: dict[str, tuple[Any, ...]] = {}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            choices.update(recipe_choices(sub, f"{prefix}{name}."))
        elif get_origin(sub) is Literal:
            choices[f"{prefix}{name}"] = get_args(sub)
    return choices


def _known_keys() -> list[str]:
    return [name for name, _, _ in recipe_fields()] + list(Recipe.model_fields)


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line positionals as (recipe files, overrides): every console script takes `a.b=c`
    overrides both as positionals and after `--set`, so an argument holding `=` is an override."""
    return [a for a in args if "=" not in a], [a for a in args if "=" in a]


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise RecipeError([f"override {override!r}: expected key.path=value"])
    key, raw = override.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError([f"override {override!r}: {part} is not a section"])
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _describe_error(err: dict) -> str:
    """Turn one pydantic error into '<field>: <what was expected>, got <what>'."""
    loc = ".".join(str(p) for p in err["loc"])
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        hint = difflib.get_close_matches(loc, _known_keys(), n=1, cutoff=0.6)
        return f"{loc}: unknown field" + (f"; did you mean {hint[0]}?" if hint else "")
    if kind == "missing":
        section = Recipe.model_fields.get(loc)
        if section is not None and isinstance(section.annotation, type) and issubclass(section.annotation, BaseModel):
            # a whole section left out: name the field(s) it must give, not the section
            loc = ", ".join(f"{loc}.{name}" for name, field in section.annotation.model_fields.items()
                            if field.is_required()) or loc
        return f"{loc}: required field missing"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        return msg if not loc or msg.startswith(loc) else f"{loc}: {msg}"
    expected = {
        "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
        "float_parsing": "a number", "float_type": "a number",
        "bool_parsing": "true or false", "bool_type": "true or false",
        "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
        "model_type": "a mapping of fields", "tuple_type": "a list",
        "too_short": "more items", "too_long": "fewer items",
    }.get(kind)
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()))  # its type is the field's: an int bound on an int field
        number = "an integer" if isinstance(bound, int) else "a number"
        expected = f"{number} {bounds[kind]} {bound}"
    elif kind == "literal_error":
        expected = "one of " + str(ctx.get("expected", "")).replace("'", "")
    if expected is None:
        expected = err["msg"][0].lower() + err["msg"][1:]
    return f"{loc}: expected {expected}, got {got!r}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b=c` overrides (values parsed as YAML), validate.

    Raises RecipeError listing every problem, each prefixed with the file name.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError([f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: expected a mapping of sections, got {type(data).__name__}"])
    try:
        for override in overrides:
            _apply_override(data, override)
    except RecipeError as err:
        raise RecipeError([f"{path}: {line}" for line in err.lines]) from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError([f"{path}: {_describe_error(e)}" for e in exc.errors()]) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written into every run folder)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
