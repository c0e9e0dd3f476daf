"""Every output users read besides the penultimate features: last_hidden_state and pooler_output of the two models,
the converted weights, and both models against an independent reference (vitparity's own classes) when the
checkpoints' own code runs."""

from __future__ import annotations

import pytest

from vitparity.report import format_report


def test_outputs(parity_case, case_result, record_comparison) -> None:
    """last_hidden_state (after the post-norm, per token) and pooler_output of hf and packing, each case alone, from
    the same whole forwards as its features; min cosine above the threshold."""
    for comparison in case_result.outputs:
        record_comparison(comparison)
    failed = [c for c in case_result.outputs if not c.passed]
    if failed:
        pytest.fail(format_report(failed, title=f"{parity_case.id}: outputs after the penultimate layer"),
                    pytrace=False)


def test_reference(parity, parity_case, case_result, record_comparison, layer_trace) -> None:
    """Each model's penultimate features against vitparity's own classes on the hf checkpoint's weights (the hf
    model itself when it runs them): a fault both release files share (common mode) passes parity but not this; a
    failure names the odd one out and traces it, layer by layer, against the reference."""
    verdict = case_result.reference
    if isinstance(verdict, str):
        pytest.fail(verdict, pytrace=False)
    for comparison in verdict.comparisons:
        record_comparison(comparison)
    if not verdict.passed:
        title = (f"{parity_case.id}: odd one out: {verdict.odd_one_out}"
                 + (" (hf and packing agree with each other, not with the reference)"
                    if verdict.odd_one_out == "common mode" else "")
                 + f" ({parity.settings.dtype}, {parity.settings.device})")
        failed = [c for c in verdict.comparisons if not c.passed]
        pytest.fail(format_report(failed, title=title) + layer_trace(case_result, odd_one_out=verdict.odd_one_out),
                    pytrace=False)


def test_converted_weights(parity, record_figure) -> None:
    """Each packing tensor equals, exactly, the hf tensor(s) it comes from by the converter's mapping (fused qkv =
    cat(q, k, v), the RoPE buffers where both models keep them); catches conversion faults of layers whose outputs the
    features never see. A buffer only one model keeps is left out, the reason recorded (JUnit property `left_out`)."""
    checked = parity.converted_weights()
    for line in checked.left_out:
        record_figure("left_out", line)
    if checked.problems:
        pytest.fail("packing weights that are not the converted hf weights:\n  " + "\n  ".join(checked.problems)
                    + "".join(f"\n  left out: {line}" for line in checked.left_out), pytrace=False)
