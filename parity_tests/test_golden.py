"""Each model's features against its committed golden snapshot (fixtures/golden/<model>-<fingerprint>-<dtype>-<frames>of<context>-<align>/)."""

from __future__ import annotations

import pytest

from vitparity.pytest_plugin import golden_meta
from vitparity.snapshots import GoldenData


@pytest.mark.golden
@pytest.mark.parametrize("side", ["hf", "packing"])
def test_golden(side, parity_case, case_features, parity, golden, request) -> None:
    """Regenerating (--snapshot-update) refuses to write the golden of a broken pair: parity fails for the case,
    or either model's weights are not sane (test_loaded_weights)."""
    refusal = ""
    if request.config.option.update_snapshots:
        if not case_features.comparison.passed:
            refusal = "packing vs non-packing parity fails for this case"
        elif any(parity.weight_problems().values()):
            refusal = "the loaded weights are not sane (see test_loaded_weights)"
    features = case_features.hf if side == "hf" else case_features.packing
    data = GoldenData.from_features(
        features, golden_meta(parity, case_features, side), refusal=refusal, case=f"{side}/{parity_case.id}"
    )
    golden(side, data)
