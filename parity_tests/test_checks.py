"""Checks that make the parity verdicts trustworthy: sane weights, determinism, independence of neighbours."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from vitparity.checks import feature_difference, pixel_difference
from vitparity.compare import NEIGHBOUR_MIN_COS, compare_features
from vitparity.report import format_report


def warn_unreadable(unreadable: dict[str, str]) -> None:
    """Cases left out of the pack because their media cannot be read (their own tests fail on it)."""
    for case_id, reason in unreadable.items():
        warnings.warn(f"{case_id} left out of the packed batch: {reason}", stacklevel=2)


@pytest.mark.parametrize("side", ["hf", "packing"])
def test_loaded_weights(parity, side) -> None:
    """Every parameter and buffer finite and loaded, RoPE inverse frequencies equal to the formula.

    Two models broken the same way (e.g. uninitialised RoPE buffers) can agree with each other; this cannot.
    The two configs are compared before any forward pass when the models load.
    """
    loaded = parity.models()[0 if side == "hf" else 1]
    problems = parity.weight_problems()[side]
    if problems:
        pytest.fail(f"{loaded.describe()}:\n  " + "\n  ".join(problems), pytrace=False)


def test_deterministic(parity, parity_case, case_features) -> None:
    """Decoding the media again gives the same pixels, and a second forward pass of each model on the same
    pixels gives identical features (the two are told apart, so a failure names its cause)."""
    problems = []
    first_pixels = case_features.media.frames
    pixels = parity.load_case_media(parity_case).frames
    if not np.array_equal(first_pixels, pixels):
        problems.append(f"decoding the media twice gave different pixels ({pixel_difference(first_pixels, pixels)})")
    again = parity.extract(parity_case, media=case_features.media)
    for side, first, second in (("hf", case_features.hf, again.hf), ("packing", case_features.packing, again.packing)):
        if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
            problems.append(f"{side} model gives NaN or Inf features (test_parity reports where)")
        elif not torch.equal(first, second):
            problems.append(f"{side} model not deterministic: {feature_difference(first, second)} between two "
                            f"passes on the same pixels")
    if problems:
        pytest.fail(f"{parity_case.id}: " + "; ".join(problems)
                    + f" ({parity.settings.dtype}, {parity.settings.device})", pytrace=False)


def compare_packed(parity, side: str, threshold: float, prefix: str, labels: tuple[str, str]) -> list:
    """Each readable case's packed-batch features against its features from `side` run alone."""
    packed, unreadable = parity.packed_features()
    warn_unreadable(unreadable)
    return [
        compare_features(getattr(parity.features(case), side), packed[case.id], name=f"{prefix}{case.id}",
                         threshold=threshold, labels=labels)
        for case in parity.settings.cases
        if case.id in packed
    ]


@pytest.mark.packed
def test_packed_batch(parity, record_comparison) -> None:
    """All cases in one packing forward equal the non-packing features (catches cross-sample attention)."""
    comparisons = compare_packed(parity, "hf", parity.settings.threshold, "packed/", ("hf", "packing"))
    for comparison in comparisons:
        record_comparison(comparison)
    failed = [c for c in comparisons if not c.passed]
    if failed:
        pytest.fail(format_report(failed, title="packed batch vs non-packing"), pytrace=False)


@pytest.mark.packed
def test_packing_independent_of_neighbours(parity) -> None:
    """A sample's packing features do not depend on what else is packed with it."""
    threshold = NEIGHBOUR_MIN_COS[parity.settings.dtype]
    comparisons = compare_packed(parity, "packing", threshold, "alone vs packed/", ("alone", "packed"))
    failed = [c for c in comparisons if not c.passed]
    if failed:
        pytest.fail(format_report(failed, title=f"packing model, alone vs packed (min cos > {threshold})"),
                    pytrace=False)
