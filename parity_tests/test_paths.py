"""The release's other calls of the models on the same tokens: explicit positions and any token order."""

from __future__ import annotations

import pytest

from vitparity.report import format_report


def test_input_paths(case_result, record_comparison) -> None:
    """The release's other calls of the non-packing model on the same tokens agree token for token: explicit
    `patch_positions` (a video's sampled frames; a codec-style case's mosaics) against the context call
    (whole-frame or sparse `visible_indices`) and against the packing model."""
    if not case_result.paths:
        pytest.fail(f"{case_result.case.id}: no input path was compared", pytrace=False)
    for comparison in case_result.paths:
        record_comparison(comparison)
    failed = [comparison for comparison in case_result.paths if not comparison.passed]
    if failed:
        pytest.fail(format_report(failed, title=f"{case_result.case.id}: input paths"), pytrace=False)


def test_token_order(case_result, record_comparison) -> None:
    """Neither model masks attention by order: a codec-style case fed in a shuffled order (tokens with their
    positions) on every path that takes an order gives the same features, put back in order (catches index
    sorting and order-dependent kernels)."""
    if not case_result.token_order:
        pytest.fail(f"{case_result.case.id}: no path was fed in another order", pytrace=False)
    for comparison in case_result.token_order:
        record_comparison(comparison)
    failed = [comparison for comparison in case_result.token_order if not comparison.passed]
    if failed:
        pytest.fail(format_report(failed, title=f"{case_result.case.id}: token order"), pytrace=False)
