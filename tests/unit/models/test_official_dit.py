"""dydit-convert: checkpoints of the original DiT / DyDiT code compute, after conversion, what the
original eval forward computes (masked and fast paths), and bad files are one-line errors.

The reference below is written from the original layout and eval semantics: fused qkv (Q|K|V thirds,
head-major), [cos, sin] timestep features with frequencies exp(−ln 10⁴·i/half), routers thresholded at
logit 0 with head 0 / group 0 always on, head masks before the output projection, group masks before
GELU, and the token mask on the whole gated MLP output.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dydit_scale import apply_schedule, cli, export_schedule, load_run
from dydit_scale.convert_cli import main
from dydit_scale.infer.runs import resolve_checkpoint
from dydit_scale.models.loading import load_transformer
from dydit_scale.models.tiny import vae

WIDTH, HEADS, DEPTH, PATCH, INPUT, IN_CH = 64, 4, 2, 2, 8, 4
CLASSES = 1000  # DiTPipeline's guidance feeds the null class 1000
TIMESTEPS = [999, 700, 500, 250, 21, 0]


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D table: first half of the channels encodes the column, second half the row."""
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()[None]


def _features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class _Named(nn.Module):
    """A container whose children are given by keyword (to reproduce the original key names)."""

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class RefBlock(nn.Module):
    def __init__(self, c: int, heads: int, dynamic: bool):
        super().__init__()
        self.heads, self.dynamic = heads, dynamic
        self.attn = _Named(qkv=nn.Linear(c, 3 * c), proj=nn.Linear(c, c))
        self.mlp = _Named(fc1=nn.Linear(c, 4 * c), fc2=nn.Linear(4 * c, c))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        if dynamic:
            self.attn_rate = _Named(router=nn.Linear(c, heads - 1))
            self.mlp_rate = _Named(router=nn.Linear(c, heads - 1))
            self.token_selection = _Named(mlp_head=nn.Sequential(nn.Linear(c, c // 16), nn.ReLU(), nn.Linear(c // 16, 1)))

    def unit_masks(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(t_emb.shape[0], 1)
        heads = torch.cat([ones, (self.attn_rate.router(t_emb) > 0).float()], dim=1)
        groups = torch.cat([ones, (self.mlp_rate.router(t_emb) > 0).float()], dim=1)
        return heads, groups

    def forward(self, x: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, width = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        heads = groups = torch.ones(b, self.heads)
        if self.dynamic:
            heads, groups = self.unit_masks(t_emb)
        q, k, v = self.attn.qkv(_modulate(x, shift_a, scale_a)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        attn = (weights @ v) * heads[:, :, None, None]
        x = x + gate_a[:, None] * self.attn.proj(attn.transpose(1, 2).reshape(b, n, width))
        keep = torch.ones(b, n, 1)
        if self.dynamic:
            keep = (self.token_selection.mlp_head(x) > 0).float()
        hidden = self.mlp.fc1(_modulate(x, shift_m, scale_m))
        hidden = hidden * groups.repeat_interleave(hidden.shape[-1] // self.heads, dim=1)[:, None]
        update = gate_m[:, None] * self.mlp.fc2(F.gelu(hidden, approximate="tanh"))
        return x + keep * update, keep


class RefDiT(nn.Module):
    """The original DiT / DyDiT eval forward, written from its layout."""

    def __init__(self, dynamic: bool, learn_sigma: bool = True):
        super().__init__()
        c, self.out_ch = WIDTH, IN_CH * (2 if learn_sigma else 1)
        self.x_embedder = _Named(proj=nn.Conv2d(IN_CH, c, PATCH, stride=PATCH))
        self.pos_embed = nn.Parameter(_pos_embed(c, INPUT // PATCH), requires_grad=False)
        self.t_embedder = _Named(mlp=nn.Sequential(nn.Linear(256, c), nn.SiLU(), nn.Linear(c, c)))
        self.y_embedder = _Named(embedding_table=nn.Embedding(CLASSES + 1, c))
        self.blocks = nn.ModuleList([RefBlock(c, HEADS, dynamic) for _ in range(DEPTH)])
        self.final_layer = _Named(adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c)),
                                  linear=nn.Linear(c, PATCH * PATCH * self.out_ch))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, grid = x.shape[0], x.shape[-1] // PATCH
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        t_emb = self.t_embedder.mlp(_features(t))
        c = t_emb + self.y_embedder.embedding_table(y)
        self.kept = []
        for block in self.blocks:
            h, keep = block(h, c, t_emb)
            self.kept.append(keep)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = self.final_layer.linear(_modulate(h, shift, scale))
        h = h.reshape(b, grid, grid, PATCH, PATCH, self.out_ch)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(b, self.out_ch, grid * PATCH, grid * PATCH)


def _reference(dynamic: bool, seed: int = 0) -> RefDiT:
    """Random weights large enough that every part matters; router biases 0, so the router weights
    decide, and units and tokens switch on and off with t."""
    torch.manual_seed(seed)
    model = RefDiT(dynamic)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.normal_(0.0, 0.3 if "router" in name or "mlp_head" in name else 0.08)
            if dynamic and name.endswith("bias") and ("router" in name or "mlp_head" in name):
                param.zero_()
    return model.eval()


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, IN_CH, INPUT, INPUT, generator=g), torch.randint(0, CLASSES + 1, (batch,), generator=g)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def dydit(tmp_path_factory):
    """(reference, converted run folder) of a random DyDiT saved as a training checkpoint."""
    ref = _reference(dynamic=True)
    folder = tmp_path_factory.mktemp("dydit")
    ckpt = folder / "dydit.pt"
    args = argparse.Namespace(token_ratio=0.6, model="DiT-tiny")
    torch.save({"model": {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}, "ema": ref.state_dict(),
                "args": args}, ckpt)
    assert main(["official-dydit", str(ckpt), str(folder / "run")]) == 0
    return ref, folder / "run"


def test_the_reference_switches_heads_groups_and_tokens_off_at_some_timesteps(dydit):
    ref, _ = dydit
    t_emb = ref.t_embedder.mlp(_features(torch.tensor(TIMESTEPS)))
    heads, groups = zip(*(block.unit_masks(t_emb) for block in ref.blocks))
    for masks in (torch.stack(heads), torch.stack(groups)):
        assert 0 < masks.mean() < 1 and not torch.equal(masks[:, 0], masks[:, -1])  # varies with t
    x, y = _inputs(len(TIMESTEPS), 1)
    with torch.no_grad():
        ref(x, torch.tensor(TIMESTEPS), y)
    assert 0.1 < float(torch.stack(ref.kept).mean()) < 0.9


def test_converted_run_matches_the_original_forward(dydit):
    ref, run = dydit
    loaded = load_run(run)
    assert loaded.step == 0 and loaded.recipe.dynamic.importance_norm == "none"
    assert loaded.recipe.dynamic.target_flops_ratio == 0.6  # the checkpoint's own training argument
    worst = 0.0
    for seed in range(3):
        x, y = _inputs(len(TIMESTEPS), seed)
        t = torch.tensor(TIMESTEPS)
        with torch.no_grad():
            want = ref(x, t, y)
            got = loaded.model(hidden_states=x, timestep=t, class_labels=y).sample
        worst = max(worst, _rel(got, want))
    print(f"masked path max relative error {worst:.2e}")
    assert worst <= 1e-4


def test_fast_path_of_the_converted_run_matches_the_original_forward(dydit):
    ref, run = dydit
    model = load_run(run).model
    keys = torch.tensor(TIMESTEPS)
    fast = apply_schedule(model, export_schedule(model, keys))
    worst = 0.0
    for step, key in enumerate(TIMESTEPS):
        x, y = _inputs(3, 10 + step)
        t = torch.full((3,), key)
        with torch.no_grad():
            want = ref(x, t, y)
            got = fast(hidden_states=x, timestep=t, class_labels=y).sample
        worst = max(worst, _rel(got, want))
    print(f"fast path max relative error {worst:.2e}")
    assert worst <= 1e-4


def test_run_folder_holds_a_routers_only_step_on_an_unchanged_transformer(dydit):
    _, run = dydit
    step = resolve_checkpoint(run)
    marker = json.loads((step / "dydit_state.json").read_text())
    assert marker["weights"] == "routers" and marker["source"]["entry"] == "ema"
    assert sorted(p.name for p in step.iterdir()) == ["dydit_state.json", "routers.safetensors"]
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["_timestep_freq_shift"] == 0 and config["num_attention_heads"] == HEADS


def test_official_dit_converts_to_a_stock_diffusers_folder(tmp_path):
    ref = _reference(dynamic=False, seed=1)
    torch.save(ref.state_dict(), tmp_path / "dit.pt")
    assert main(["official-dit", str(tmp_path / "dit.pt"), str(tmp_path / "out"), "--heads", str(HEADS)]) == 0
    model = load_transformer(tmp_path / "out", "dit")
    assert type(model).__name__ == "DiTTransformer2DModel"
    x, y = _inputs(len(TIMESTEPS), 2)
    t = torch.tensor(TIMESTEPS)
    with torch.no_grad():
        rel = _rel(model(hidden_states=x, timestep=t, class_labels=y).sample, ref(x, t, y))
    print(f"static max relative error {rel:.2e}")
    assert rel <= 1e-4


def test_a_converted_pipeline_run_exports_and_samples_through_the_clis(tmp_path):
    vae(IN_CH, flux=False).save_pretrained(tmp_path / "vae")
    torch.save({"ema": _reference(dynamic=True, seed=2).state_dict()}, tmp_path / "dydit.pt")
    run = tmp_path / "run"
    assert main(["official-dydit", str(tmp_path / "dydit.pt"), str(run), "--vae", str(tmp_path / "vae"),
                 "--target-flops-ratio", "0.7"]) == 0
    assert json.loads((run / "model" / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert load_run(run).recipe.data.resolution == INPUT * 2  # the tiny VAE's scale
    assert cli.export([str(run), str(tmp_path / "schedule"), "--steps", "3"]) == 0
    argv = [str(run), str(tmp_path / "samples"), "--schedule", str(tmp_path / "schedule"), "--prompt", "3",
            "--seed", "0"]
    assert cli.sample(argv) == 0
    assert (tmp_path / "samples" / "samples.png").is_file() and (tmp_path / "samples" / "compute_map.png").is_file()


class Custom:
    pass


def _one_line_error(capsys, argv: list[str], pattern: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dydit-convert: ")
    assert pattern in err, err


def test_a_file_that_needs_a_full_unpickle_is_refused(tmp_path, capsys):
    torch.save({"ema": {"w": torch.zeros(1)}, "extra": Custom()}, tmp_path / "bad.pt")
    _one_line_error(capsys, ["official-dydit", str(tmp_path / "bad.pt"), str(tmp_path / "out")],
                    "not a weights-only checkpoint (it pickles test_official_dit.Custom)")
    assert not (tmp_path / "out").exists()


def test_not_a_state_dict_missing_keys_and_wrong_shapes_are_one_line(tmp_path, capsys):
    (tmp_path / "text.pt").write_text("hello\n")
    _one_line_error(capsys, ["official-dit", str(tmp_path / "text.pt"), str(tmp_path / "o0")],
                    "text.pt: not a torch checkpoint")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    _one_line_error(capsys, ["official-dit", str(tmp_path / "list.pt"), str(tmp_path / "o1")],
                    "list.pt: expected a state dict")
    state = _reference(dynamic=True).state_dict()
    torch.save(state, tmp_path / "dydit.pt")
    _one_line_error(capsys, ["official-dit", str(tmp_path / "dydit.pt"), str(tmp_path / "o2")],
                    "holds DyDiT routers; convert it with official-dydit")
    broken = dict(state)
    broken["blocks.1.mlp.fc2.weight"] = torch.zeros(WIDTH, 3 * WIDTH)
    torch.save(broken, tmp_path / "shape.pt")
    _one_line_error(capsys, ["official-dydit", str(tmp_path / "shape.pt"), str(tmp_path / "o3")],
                    f"blocks.1.mlp.fc2.weight has shape [{WIDTH}, {3 * WIDTH}], expected [{WIDTH}, {4 * WIDTH}]")
    missing = {k: v for k, v in state.items() if k != "final_layer.linear.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    _one_line_error(capsys, ["official-dydit", str(tmp_path / "missing.pt"), str(tmp_path / "o4")],
                    "missing ['final_layer.linear.bias']")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_an_early_checkpoint_with_one_router_output_per_head_is_named(tmp_path, capsys):
    state = _reference(dynamic=True).state_dict()
    for i in range(DEPTH):
        for name in ("attn_rate", "mlp_rate"):
            state[f"blocks.{i}.{name}.router.weight"] = torch.zeros(HEADS, WIDTH)
            state[f"blocks.{i}.{name}.router.bias"] = torch.zeros(HEADS)
    torch.save({"ema": state}, tmp_path / "old.pt")
    _one_line_error(capsys, ["official-dydit", str(tmp_path / "old.pt"), str(tmp_path / "out")],
                    "an early (Dec 2024) DyDiT checkpoint")
