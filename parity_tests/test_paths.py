"""The release's other calls of the models on the same tokens: explicit positions and any token order."""

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


def _all_pass(case_id: str, comparisons: list, record_comparison, title: str, none: str) -> None:
    """Record every comparison; fail when there is none, or with the report of those that failed."""
    if not comparisons:
        pytest.fail(f"{case_id}: {none}", pytrace=False)
    for comparison in comparisons:
        record_comparison(comparison)
    failed = [comparison for comparison in comparisons if not comparison.passed]
    if failed:
        pytest.fail(format_report(failed, title=f"{case_id}: {title}"), pytrace=False)
