"""Packing vs non-packing penultimate features, per case, each model run on the case alone."""

from __future__ import annotations

import pytest


def test_parity(case_result, parity, record_comparison, layer_trace) -> None:
    """Shapes equal, all finite, min per-token cosine above the threshold; a failure says at which layer the two
    models first part ways."""
    record_comparison(case_result.comparison)
    if not case_result.comparison.passed:
        pytest.fail(parity.parity_failure(case_result) + layer_trace(case_result), pytrace=False)
