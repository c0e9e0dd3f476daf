"""Packing vs non-packing penultimate features, per case, each model run on the case alone."""

from __future__ import annotations

import pytest


def test_parity(case_result, parity, record_comparison, layer_trace) -> None:
    """Shapes equal, all finite, min per-token cosine above the threshold, and the precision bars of the run's dtype
    held (in a bfloat16 / float16 run, the case that carries the run's float32 probe must also hold the float32
    bars); a failure says which bar failed and at which layer the two models first part ways."""
    for comparison in case_result.comparisons:
        record_comparison(comparison)
    if not case_result.passed:
        pytest.fail(parity.parity_failure(case_result) + layer_trace(case_result), pytrace=False)
