"""Packing vs non-packing penultimate features, per case and with every case packed into one pass."""

from __future__ import annotations

import pytest

from vitparity.compare import compare_features
from vitparity.pytest_plugin import heatmap_for
from vitparity.report import format_report


def test_parity(case_features, parity, record_comparison) -> None:
    """Shapes equal, all finite, min per-token cosine above the threshold."""
    comparison = case_features.comparison
    record_comparison(comparison)
    if not comparison.passed:
        heatmap = heatmap_for(parity, comparison, case_features.grid)
        pytest.fail(format_report([comparison]) + (f"\nheat map: {heatmap}" if heatmap else ""), pytrace=False)


@pytest.mark.packed
def test_packed_batch(parity, record_comparison) -> None:
    """All cases in one packing forward equal the non-packing features (catches cross-sample attention)."""
    failed = []
    for case, packed in zip(parity.settings.cases, parity.packed_features()):
        alone = parity.features(case)
        comparison = compare_features(alone.hf, packed, name=f"packed/{case.id}", threshold=parity.settings.threshold)
        record_comparison(comparison)
        if not comparison.passed:
            failed.append(comparison)
    if failed:
        pytest.fail(format_report(failed, title="packed batch vs non-packing"), pytrace=False)
