"""Each model's features against its committed golden snapshot (fixtures/golden/<model>-<fingerprint>-<dtype>-<frames>of<context>-<align>/)."""

from __future__ import annotations

import pytest


@pytest.mark.golden
@pytest.mark.parametrize("side", ["hf", "packing"])
def test_golden(side, parity_case, golden) -> None:
    """Regenerating (--snapshot-update) refuses to write the golden of a broken pair: parity fails for the case,
    or either model's weights are not sane (test_loaded_weights)."""
    golden(side)
