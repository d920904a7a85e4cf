"""The real trainer under the real launchers: 2 ranks match 1 rank, resume matches an uninterrupted
run, a kill during a save loses nothing, bad samples are counted, the ZeRO-3 adapter file is real."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["data.workers=1", "data.shuffle_buffer=0", "validation.every_steps=1000", "log.tensorboard=false",
          "dynamic.complete_warmup_steps=1", "dynamic.target_hold_steps=0", "dynamic.target_warmup_steps=2"]


@pytest.fixture(scope="module")
def flux_dir(tiny_model_dir):
    return tiny_model_dir("flux")


@pytest.fixture(scope="module")
def same_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    launch.write_identical_shards(out, shards=4, per_shard=8)
    return out


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in launch.metrics(run_dir)]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank_on_the_same_global_batch(tmp_path, flux_dir, same_shards, stage):
    """Every sample is identical and randomness is keyed by global slot, so 2 ranks × 1 micro-batch of 2
    and 1 rank × 2 micro-batches of 2 see the same global batch. The FLOPs loss is switched off here:
    its square of a global mean is not additive over micro-batches; its 2-rank mean is tested in
    tests/unit/dynamic/test_flops_loss.py."""
    common = [*COMMON, f"model.path={flux_dir}", f"data.shards={same_shards}", "data.batch_size=2",
              "train.steps=3", "checkpoint.every_steps=100", f"train.zero_stage={stage}",
              "dynamic.flops_loss_weight=0", f"run.output_dir={tmp_path}"]
    launch.train([*common, "run.name=one", "train.grad_accum=2"], ranks=1)
    launch.train([*common, "run.name=two", "train.grad_accum=1"], ranks=2)
    one, two = _losses(tmp_path / "one", "diffusion_loss"), _losses(tmp_path / "two", "diffusion_loss")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    assert _losses(tmp_path / "two", "flops_ratio") == pytest.approx(_losses(tmp_path / "one", "flops_ratio"), abs=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path, flux_dir, stage):
    """Losses, sample keys and the (per-rank, ZeRO-3 partition-local) EMA continue exactly."""
    shards = tmp_path / "shards"
    from dydit_scale.data.synthetic import write_synthetic_shards

    write_synthetic_shards(shards, "image", 32, per_shard=8)
    common = [*COMMON, f"model.path={flux_dir}", f"data.shards={shards}", "data.batch_size=2",
              "data.shuffle_buffer=8", "train.steps=4", "checkpoint.every_steps=2", "log.sample_ledger=true",
              f"train.zero_stage={stage}", "train.ema_decay=0.9", f"run.output_dir={tmp_path}"]
    launch.train([*common, "run.name=full"], ranks=2)
    launch.train([*common, "run.name=resumed", f"checkpoint.resume={tmp_path / 'full/checkpoints/step-0000002'}"], ranks=2)
    full, resumed = launch.metrics(tmp_path / "full"), launch.metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [3, 4]
    for key in ("loss", "diffusion_loss", "flops_loss", "flops_ratio", "lr"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in full[2:]], abs=1e-6), key
    for rank in (0, 1):
        ledger = lambda run: [json.loads(l) for l in (tmp_path / run / "ledger" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert ledger("resumed") == ledger("full")[2:]
        ema = lambda run: load_file(tmp_path / run / "checkpoints" / "step-0000004" / f"ema-rank{rank}.safetensors")
        full_ema, resumed_ema = ema("full"), ema("resumed")
        assert full_ema.keys() == resumed_ema.keys() and full_ema
        for key in full_ema:
            torch.testing.assert_close(resumed_ema[key], full_ema[key], rtol=0, atol=1e-6)


def test_kill_during_save_resumes_from_the_previous_checkpoint(tmp_path, flux_dir, same_shards):
    common = [*COMMON, f"model.path={flux_dir}", f"data.shards={same_shards}", "data.batch_size=2",
              "checkpoint.every_steps=1", f"run.output_dir={tmp_path}", "run.name=killed"]
    process = launch.train([*common, "train.steps=200"], ranks=1, popen=True)
    root = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and not list(root.glob("step-*.partial")) or len(list(root.glob("step-000000[0-9]"))) < 2:
            if process.poll() is not None:
                pytest.fail(f"trainer exited early:\n{process.stdout.read()[-3000:]}")
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    from dydit_scale.train.checkpoint import complete_checkpoints

    partial = sorted(root.glob("step-*.partial"))
    complete = complete_checkpoints(root)
    assert complete, "no complete checkpoint before the kill"
    last = int(complete[-1].name.split("-")[1])
    result = launch.train([*common, f"train.steps={last + 1}"], ranks=1)
    steps = [m["step"] for m in launch.metrics(tmp_path / "killed")]
    assert steps[-1] == last + 1
    assert not list(root.glob("step-*.partial")) or partial  # a stale partial is cleared or was never resumed
    assert "resumed from" in result.stdout + result.stderr


def test_bad_samples_are_skipped_counted_and_the_run_finishes(tmp_path, flux_dir):
    shards = tmp_path / "bad_shards"
    launch.write_identical_shards(shards, shards=2, per_shard=6, bad={"decode_error": 2, "missing_caption": 1})
    launch.train([*COMMON, f"model.path={flux_dir}", f"data.shards={shards}", "data.batch_size=2", "train.steps=6",
                  "checkpoint.every_steps=100", f"run.output_dir={tmp_path}", "run.name=bad"], ranks=1)
    skipped = launch.metrics(tmp_path / "bad")[-1]["skipped"]
    assert skipped["decode_error"] == 2 and skipped["missing_caption"] == 1


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_file_in_the_stock_pipeline_computes_the_fine_tuned_model(tmp_path, flux_dir, same_shards, stage):
    """Under ZeRO-3 the file holds the gathered weights, not empty partitions; under both stages it is in
    the base model's order, so stock FluxPipeline + load_lora_weights == the fine-tuned model at full width."""
    import diffusers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dydit_scale import full_width, load_run
    from dydit_scale.dynamic.importance import reorder_state_dict

    launch.train([*COMMON, f"model.path={flux_dir}", f"data.shards={same_shards}", "data.batch_size=2",
                  "train.steps=2", "checkpoint.every_steps=2", f"train.zero_stage={stage}", "lora.kind=lora",
                  "lora.targets=[to_q, to_k, to_v, to_out.0, proj_mlp, proj_out, ff.net.0.proj]", "optim.lr=0.05",
                  f"run.output_dir={tmp_path}", "run.name=lora"], ranks=2)
    step = tmp_path / "lora" / "checkpoints" / "step-0000002"
    weights = load_file(step / "pytorch_lora_weights.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "lora_B still zero: the file holds empty partitions"
    fine_tuned = load_run(step).model
    moved = [k for k, p in fine_tuned.dydit_permutations.items() if not torch.equal(p, torch.arange(p.numel()))]
    assert moved, "the test needs a permutation that is not the identity"
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(step.parent), tag=step.name)
    gathered = reorder_state_dict({k: v for k, v in gathered.items() if ".lora_" in k}, fine_tuned.dydit_spans,
                                  to_base=True)
    for key, tensor in weights.items():
        name = key.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        assert torch.allclose(tensor.float(), gathered[name].float(), atol=1e-6), key
    pipe = diffusers.FluxPipeline.from_pretrained(flux_dir)
    pipe.load_lora_weights(step)
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.8]),
                  img_ids=torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=-1),
                  txt_ids=torch.zeros(5, 3), guidance=torch.full((2,), 3.5))
    with torch.no_grad(), full_width(fine_tuned):
        expected = fine_tuned(**inputs).sample
        actual = pipe.transformer(**inputs).sample
        base = diffusers.FluxTransformer2DModel.from_pretrained(Path(flux_dir) / "transformer")(**inputs).sample
    assert (expected - base).norm() / base.norm() > 1e-3, "the adapter should change the output"
    assert (actual - expected).norm() / expected.norm() <= 1e-4


def test_bf16_with_activation_checkpointing_trains_and_samples(tmp_path, flux_dir, same_shards):
    """bf16 weights (routers, FLOPs ratio and losses stay fp32), non-reentrant checkpointing, the
    held-out losses (dynamic and full width), and the fp32 pipeline sampling from the bf16 transformer."""
    launch.train([*COMMON, f"model.path={flux_dir}", f"data.shards={same_shards}", "data.batch_size=2",
                  "train.steps=2", "checkpoint.every_steps=2", "validation.every_steps=2", "model.dtype=bf16",
                  "train.activation_checkpointing=true", f"data.val_shards={same_shards}", "validation.batches=1",
                  f"run.output_dir={tmp_path}", "run.name=bf16"])
    rows = launch.metrics(tmp_path / "bf16")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] is not None for r in rows)
    assert rows[-1]["heldout_loss"] > 0 and rows[-1]["heldout_loss_full_width"] > 0
    assert (tmp_path / "bf16" / "samples" / "step-0000002.png").is_file()
