"""On CUDA, the fast (sliced) path computes what the masked path computes, with SDPA and with xformers.

Three comparisons, each suited to where bf16 rounding can change a decision:
- head and MLP-group routing (TDW) in bf16, tiny widths: the fast path follows the schedule exported
  from the masked model, so both make the same decisions; the bound is twice the masked path's own
  bf16 error (relative L2), measured against an fp32 copy that executes the same schedule;
- token routing (SDT) in fp32, tiny widths: a token router decides on hidden states, and bf16 rounding
  differences from earlier blocks could flip a token near its threshold, which says nothing about
  the kernels; fp32 keeps the decisions equal, so gather/scatter is held to a tight bound;
- released widths (one block per stack, TDW + SDT) in bf16: almost every output element must agree to
  bf16 precision; the few tokens whose decisions rounding flips may not.
"""

from __future__ import annotations

import pytest
import torch
from gpu_cases import FAMILIES, RELEASED, build_case, close_share, fast_copy, max_abs, outputs, rel_l2, tiny_preset

pytestmark = pytest.mark.gpu

BF16_FLOOR_FACTOR = 2.0
"""Two bf16 paths, each within the masked path's error of the truth, differ by at most about twice it;
tighter would flag rounding, looser would pass a schedule applied at the wrong key (tiny FLUX)."""
FP32_ATOL = 1e-4
BF16_CLOSE_TOL, BF16_CLOSE_SHARE = 3e-2, 0.99


@pytest.mark.parametrize("family", FAMILIES)
def test_tdw_fast_path_matches_masked_in_bf16(family, backend, device, record):
    case = build_case(tiny_preset(family, tokens=False), device, torch.bfloat16)
    expected = outputs(case.masked, case.inputs)
    got = outputs(fast_copy(case, backend), case.inputs)
    truth = outputs(fast_copy(case, "sdpa", fp32=True), case.inputs, torch.float32)
    tolerance = BF16_FLOOR_FACTOR * rel_l2(expected, truth) + 1e-3
    error, diff = rel_l2(got, expected), max_abs(got, expected)
    record(kind="tdw", case=family, backend=backend, dtype="bf16", max_abs_diff=diff, rel_l2=error,
           tolerance=tolerance)
    assert error <= tolerance, f"|fast - masked| / |masked| = {error:.3e} > {tolerance:.3e} (max abs {diff:.3e})"


@pytest.mark.parametrize("family", FAMILIES)
def test_sdt_fast_path_matches_masked_in_fp32(family, backend, device, record):
    case = build_case(tiny_preset(family, tokens=True), device, torch.float32)
    expected = outputs(case.masked, case.inputs)
    got = outputs(fast_copy(case, backend), case.inputs)
    tolerance = FP32_ATOL * max(1.0, float(expected.abs().max()))
    diff = max_abs(got, expected)
    record(kind="sdt", case=family, backend=backend, dtype="fp32", max_abs_diff=diff, tolerance=tolerance)
    assert diff <= tolerance, f"max |fast - masked| {diff:.3e} > {tolerance:.3e}"


@pytest.fixture(scope="module")
def released(device):
    """`released(preset)`: the masked model of a released-width preset in bf16, built once per module."""
    if device.type != "cuda":
        pytest.skip("released widths run on CUDA only")
    built = {}

    def get(name: str):
        if name not in built:
            built.clear()  # one released model on the device at a time
            torch.cuda.empty_cache()
            built[name] = build_case(name, device, torch.bfloat16)
        return built[name]

    return get


@pytest.mark.parametrize("preset", RELEASED)
def test_released_width_fast_path_matches_masked_in_bf16(preset, backend, released, record):
    case = released(preset)
    expected = outputs(case.masked, case.inputs)
    got = outputs(fast_copy(case, backend), case.inputs)
    share, diff = close_share(got, expected, BF16_CLOSE_TOL), max_abs(got, expected)
    record(kind="released", case=preset, backend=backend, dtype="bf16", max_abs_diff=diff,
           rel_l2=rel_l2(got, expected), close_share=share)
    assert share >= BF16_CLOSE_SHARE, (f"{100 * share:.2f} % of outputs within bf16 tolerance "
                                       f"(goal >= {100 * BF16_CLOSE_SHARE:.0f} %), max |fast - masked| {diff:.3e}")
