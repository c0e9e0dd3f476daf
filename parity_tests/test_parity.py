"""Packing vs non-packing penultimate features, per case, each model run on the case alone."""

from __future__ import annotations

import pytest


def test_parity(case_result, parity, record_comparison) -> None:
    """Shapes equal, all finite, min per-token cosine above the threshold."""
    record_comparison(case_result.comparison)
    if not case_result.comparison.passed:
        pytest.fail(parity.parity_failure(case_result), pytrace=False)
