"""Each model's features against its committed golden snapshot (fixtures/golden/<model>-<fingerprint>-<dtype>-<frames>of<context>-<align>/)."""

from __future__ import annotations

import pytest

from vitparity.pytest_plugin import golden_meta
from vitparity.snapshots import GoldenData


@pytest.mark.golden
@pytest.mark.parametrize("side", ["hf", "packing"])
def test_golden(side, parity_case, case_features, parity, golden, request) -> None:
    """Regenerating (--snapshot-update) refuses to write the golden of a case whose parity fails."""
    updating = bool(request.config.option.update_snapshots)
    features = case_features.hf if side == "hf" else case_features.packing
    data = GoldenData.from_features(
        features,
        golden_meta(parity, case_features, side),
        blessable=case_features.comparison.passed or not updating,
        case=f"{side}/{parity_case.id}",
    )
    golden(side, data)
