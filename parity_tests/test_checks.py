"""Checks that make the parity verdicts trustworthy: sane weights, determinism, independence of neighbours."""

from __future__ import annotations

import warnings

import pytest

from vitparity.report import format_report


@pytest.mark.parametrize("side", ["hf", "packing"])
def test_loaded_weights(parity, side) -> None:
    """Every parameter and buffer finite and loaded, RoPE inverse frequencies equal to the formula.

    Two models broken the same way (e.g. uninitialised RoPE buffers) can agree with each other; this cannot.
    The two configs are compared before any forward pass when the models load.
    """
    problems = parity.weight_problems(side)[side]
    if problems:
        pytest.fail(f"{parity.model(side).describe()}:\n  " + "\n  ".join(problems), pytrace=False)


def test_deterministic(parity, parity_case, case_result) -> None:
    """Decoding the media again gives the same pixels, and a second forward pass of each model on the same
    pixels gives identical features (the two are told apart, so a failure names its cause)."""
    if case_result.determinism:
        pytest.fail(f"{parity_case.id}: " + "; ".join(case_result.determinism)
                    + f" ({parity.settings.dtype}, {parity.settings.device})", pytrace=False)


def warn_left_out(group_result) -> None:
    """Cases left out of the pack because their media cannot be read (their own tests fail on it)."""
    for case_id, reason in group_result.left_out.items():
        warnings.warn(f"{case_id} left out of pack {group_result.group.id}: {reason}", stacklevel=2)


def test_packed(group_result, record_comparison, layer_trace) -> None:
    """The group's cases in one packing forward equal the non-packing features (catches cross-sample attention);
    a failure traces each failing case, layer by layer, inside its pack."""
    warn_left_out(group_result)
    for comparison in group_result.packed_vs_hf:
        record_comparison(comparison)
    failed = [c for c in group_result.packed_vs_hf if not c.passed]
    if failed:
        pytest.fail(format_report(failed, title=f"{group_result.group.id} packed vs non-packing")
                    + layer_trace(group_result), pytrace=False)


def test_packing_independent_of_neighbours(group_result) -> None:
    """A sample's packing features do not depend on what else is packed with it."""
    failed = [c for c in group_result.packed_vs_alone if not c.passed]
    if failed:
        threshold = failed[0].threshold
        pytest.fail(format_report(failed, title=f"packing model, alone vs {group_result.group.id} "
                                  f"(min cos > {threshold})"), pytrace=False)


def test_companions_do_not_leak(group_result, record_figure) -> None:
    """Each case of the pack keeps bit-identical packing features when the other cases' pixels are replaced
    (same shapes, dtype, device and kernels): catches a dependence on the neighbours far below any threshold."""
    warn_left_out(group_result)
    swaps = group_result.companions
    if not swaps:
        pytest.fail(f"{group_result.group.id}: fewer than two readable cases in the pack, nothing to swap",
                    pytrace=False)
    for swap in swaps:
        for name, value in swap.properties():
            record_figure(name, value)
    failed = [swap for swap in swaps if not swap.passed]
    if failed:
        pytest.fail("\n".join(swap.format() for swap in failed)
                    + "\n(the swap runs the same pack twice: a packing model that is not deterministic fails it too, "
                    "see test_deterministic)", pytrace=False)
