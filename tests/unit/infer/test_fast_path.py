"""The fast (sliced) path computes what the masked path computes, at the analytic FLOPs."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from infer_cases import FAMILIES, dynamic_model, model_inputs, time_keys
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dydit_scale import apply_schedule, export_schedule
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.dynamic.schedule import UnknownTimeKeyError
from dydit_scale.lora import apply_lora, apply_td_lora
from dydit_scale.models.build import dynamic_blocks, timestep_embedding_dim


def _fast(model: torch.nn.Module, family: str, **options) -> torch.nn.Module:
    return apply_schedule(copy.deepcopy(model), export_schedule(model, time_keys(family)), **options)


def _assert_same_outputs(masked: torch.nn.Module, fast: torch.nn.Module, family: str) -> None:
    for key in time_keys(family):
        inputs = model_inputs(family, key)
        with torch.no_grad():
            expected, ratio = masked(**inputs).sample, flops_ratio(masked)
            got, fast_ratio = fast(**inputs).sample, flops_ratio(fast)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # fp32, reordered sums only
        torch.testing.assert_close(fast_ratio, ratio, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["random", "all_on", "index0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_masked_path(family, mode):
    masked = dynamic_model(family, mode)
    _assert_same_outputs(masked, _fast(masked, family), family)


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_fast_path_matches_masked_path_with_dynamic_text_mlp_and_cross_attention(family):
    masked = dynamic_model(family, "random", seed=3, text_mlp=True, cross_attention=True)
    _assert_same_outputs(masked, _fast(masked, family), family)


def test_low_memory_mode_matches_and_caches_nothing():
    masked = dynamic_model("latte", "random")
    fast = _fast(masked, "latte", low_memory=True)
    _assert_same_outputs(masked, fast, "latte")
    assert all(not block._cache for block in fast._fast_blocks)


def test_sliced_weights_are_cached_per_unique_mask():
    masked = dynamic_model("pixart", "index0")  # every step has the same masks
    fast = _fast(masked, "pixart")
    _assert_same_outputs(masked, fast, "pixart")
    assert all(len(block._cache) == 1 for block in fast._fast_blocks)


def test_the_sliced_weight_cache_holds_at_most_one_extra_copy_of_each_block():
    """A schedule whose every step is a new mask (random routers, many steps) must not keep a copy of
    the sliced weights per step: least recently used entries go once one extra copy is reached."""
    masked = dynamic_model("dit", "random", seed=1)
    keys = torch.arange(999, 0, -37)  # 27 steps
    fast = apply_schedule(copy.deepcopy(masked), export_schedule(masked, keys))
    for key in keys:
        inputs = model_inputs("dit", key)
        with torch.no_grad():
            torch.testing.assert_close(fast(**inputs).sample, masked(**inputs).sample, atol=1e-5, rtol=0)
    unique = max(len(fast.dydit_fast.schedule.unique_masks(name)[0]) for name in fast.dydit_fast.schedule.masks)
    assert unique > 4  # the test needs many distinct masks
    for block in fast._fast_blocks:
        assert 1 <= len(block._cache) < unique
        assert sum(block._cache_bytes.values()) <= block._cache_budget or len(block._cache) == 1
        assert set(block._cache_bytes) == set(block._cache)


def _randomise_adapters(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "td_gate" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["td_lora", "lora"])
@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_fast_path_merges_lora_before_slicing(family, kind):
    masked = dynamic_model(family, "random")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    targets += ["proj_mlp", "proj_out", "add_q_proj", "to_add_out"] if family == "flux" else []
    blocks = dynamic_blocks(masked)
    if kind == "td_lora":
        apply_td_lora(masked, targets=targets, rank=4, alpha=4, experts=2, cond_dim=timestep_embedding_dim(masked),
                      block_prefixes=blocks)
    else:
        apply_lora(masked, targets=targets, rank=4, alpha=4, block_prefixes=blocks)
    _randomise_adapters(masked)
    _assert_same_outputs(masked.eval(), _fast(masked, family), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_flops_equal_the_analytic_count(family):
    fast = _fast(dynamic_model(family, "random"), family)
    inputs = model_inputs(family, time_keys(family)[1])
    # FlopCounterMode counts 0 for the fused CPU SDPA kernel; the math kernel is counted matmul by matmul.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fast(**inputs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(fast).__name__
    for name, block in ((n, b) for n, b in fast.named_modules() if n and hasattr(b, "last_macs")):
        prefix = f"{root}.{name}"
        # not counted by flops.py: routers and the adaLN modulation linears inside FLUX's norms
        uncounted = sum(v for k, v in counts.items() if k.startswith(prefix + ".")
                        and k.rpartition(".")[2] in ("token_router", "norm1", "norm1_context", "norm"))
        dynamic, _ = block.last_macs()
        assert counts[prefix] - uncounted == 2 * int(dynamic.sum()), name


def test_changed_base_weights_are_detected_by_hash():
    model = dynamic_model("pixart", "random")
    schedule = export_schedule(model, time_keys("pixart"))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.transformer_blocks[1].ff.net[2].weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="base weights"):
        apply_schedule(changed, schedule)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.transformer_blocks[0].token_router.fc2.bias += 1.0
    with pytest.raises(ValueError, match="routers/adapters"):
        apply_schedule(retrained, schedule)


def test_unknown_time_key_is_an_error_in_the_forward():
    fast = _fast(dynamic_model("flux", "random"), "flux")
    with pytest.raises(UnknownTimeKeyError, match=r"0\.6299"):
        fast(**model_inputs("flux", torch.tensor(0.63)))


def test_xformers_without_cuda_is_an_error():
    model = dynamic_model("pixart", "random")
    with pytest.raises(ValueError, match="xformers needs CUDA"):
        apply_schedule(model, export_schedule(model, time_keys("pixart")), attention="xformers")


def test_cpu_run_never_imports_xformers():
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import torch\n"
        "from infer_cases import dynamic_model, model_inputs, time_keys\n"
        "from dydit_scale import apply_schedule, export_schedule\n"
        "m = dynamic_model('flux', 'random')\n"
        "fast = apply_schedule(m, export_schedule(m, time_keys('flux')))\n"
        "fast(**model_inputs('flux', time_keys('flux')[0]))\n"
        "assert not [n for n in sys.modules if n.split('.')[0] == 'xformers'], 'xformers imported'\n"
    ) % str(__import__("pathlib").Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_weight_sharing_copy_of_a_fast_model_shares_weights_and_sliced_weights():
    from dydit_scale.infer.fast import weight_sharing_memo

    masked = dynamic_model("pixart", "random")
    keys = time_keys("pixart")
    fast = apply_schedule(copy.deepcopy(masked), export_schedule(masked, keys))
    twin = copy.deepcopy(fast, weight_sharing_memo(fast))
    inputs = model_inputs("pixart", keys[1])
    torch.testing.assert_close(twin(**inputs)[0], fast(**inputs)[0], atol=0, rtol=0)
    assert all(a is b for a, b in zip(twin.parameters(), fast.parameters()))
    for mine, its in zip(twin._fast_blocks, fast._fast_blocks):
        assert mine is not its and mine._cache is its._cache and len(its._cache) == 1  # filled once, by the twin
