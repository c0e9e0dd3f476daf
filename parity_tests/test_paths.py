"""The release's other calls of the models on the same tokens: explicit positions, any token order, a batch of the
non-packing model, and the packing model's documented call (grid_thw only)."""

from __future__ import annotations

import pytest

from vitparity.report import format_report


def test_input_paths(case_result, record_comparison) -> None:
    """The release's other calls of the non-packing model on the same tokens agree token for token: explicit
    `patch_positions` (a video's sampled frames; a codec-style case's mosaics) against the context call
    (whole-frame or sparse `visible_indices`) and against the packing model."""
    _all_pass(case_result.case.id, case_result.paths, record_comparison, "input paths", "no input path was compared")


def test_token_order(case_result, record_comparison) -> None:
    """Neither model masks attention by order: a codec-style case fed in a shuffled order (tokens with their
    positions) on every path that takes an order gives the same features, put back in order (catches index
    sorting and order-dependent kernels)."""
    _all_pass(case_result.case.id, case_result.token_order, record_comparison, "token order",
              "no path was fed in another order")


def test_batch(batched, record_comparison) -> None:
    """The non-packing model run on a batch (same-size cases together, or the case with its mirror image) gives each
    case the features it has alone, within the dtype's bars (catches a forward that mixes or misorders the rows of a
    batch)."""
    _all_pass(batched.case.id, batched.batch, record_comparison, "hf batched vs alone", "no batch was run")


def test_packing_grid_call(grid_call, record_comparison, record_figure) -> None:
    """The packing model called as the release documents it (grid_thw only: the model computes each sample's (t, h,
    w) itself) equals, bit for bit, the call given those positions (t = 0..T-1, then h, w row-major), on the group's
    images and videos in one pack (catches a fault on the model's own position path, which explicit positions
    bypass). Codec-style cases are left out, the reason recorded (JUnit property `left_out`)."""
    for case_id, reason in grid_call.grid_left_out.items():
        record_figure("left_out", f"{case_id}: {reason}")
    _all_pass(grid_call.group.id, grid_call.grid_call, record_comparison, "packing grid_thw only vs grid positions",
              "no image or video case of the group could be read")


def _all_pass(case_id: str, comparisons: list, record_comparison, title: str, none: str) -> None:
    """Record every comparison; fail when there is none, or with the report of those that failed."""
    if not comparisons:
        pytest.fail(f"{case_id}: {none}", pytrace=False)
    for comparison in comparisons:
        record_comparison(comparison)
    failed = [comparison for comparison in comparisons if not comparison.passed]
    if failed:
        pytest.fail(format_report(failed, title=f"{case_id}: {title}"), pytrace=False)
