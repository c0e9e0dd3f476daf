"""Packing vs non-packing penultimate features, per case, each model run on the case alone."""

from __future__ import annotations

import pytest

from vitparity.pytest_plugin import heatmap_for
from vitparity.report import format_report


def test_parity(case_features, parity, record_comparison) -> None:
    """Shapes equal, all finite, min per-token cosine above the threshold."""
    comparison = case_features.comparison
    record_comparison(comparison)
    if not comparison.passed:
        heatmap = heatmap_for(parity, comparison, case_features.grid)
        pytest.fail(format_report([comparison]) + (f"\nheat map: {heatmap}" if heatmap else ""), pytrace=False)
