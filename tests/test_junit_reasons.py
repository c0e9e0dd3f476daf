"""`vitparity report-junit` carries the verdict's reasons (vitparity.junit_report.merge_report, runs built in memory):
a golden regression gives its bar, figure and provenance change; the matching goldens are listed; a run that
compared no parity prints no parity table; a failed trace gives its divergence in words."""

from __future__ import annotations

from pathlib import Path

from vitparity.junit_report import JUnitRun, merge_report
from vitparity.junit_report import TestOutcome as Outcome  # not a test class
from vitparity.suite.golden_state import MATCH, REGRESSION, STATE_PROPERTY

REGRESSED = ("image-x.jpg: golden in fixtures/golden/hf\nprovenance: code modeling_x.py 1a2b3c4d -> 5e6f7a8b\n"
             "golden features differ:\n  - min projected cosine 0.912345 <= 0.9999 (worst token 3)")


def test_golden_only_run_gives_reasons_and_lists_the_goldens() -> None:
    run = JUnitRun(Path("golden.xml"), tests=[
        Outcome("parity_tests.test_golden::test_golden[image-x.jpg-hf]", "failed", REGRESSED,
                    golden=[(STATE_PROPERTY, REGRESSION)]),
        Outcome("parity_tests.test_golden::test_golden[image-y.jpg-hf]", "passed", golden=[(STATE_PROPERTY, MATCH)]),
    ])
    report, passed = merge_report([run])
    assert not passed
    assert ("- `parity_tests.test_golden::test_golden[image-x.jpg-hf]` (failed, golden.xml): image-x.jpg: golden in "
            "fixtures/golden/hf; provenance: code modeling_x.py 1a2b3c4d -> 5e6f7a8b; golden features differ:; "
            "min projected cosine 0.912345 <= 0.9999 (worst token 3)") in report
    assert "### Goldens checked and matching (1)\n\n- `parity_tests.test_golden::test_golden[image-y.jpg-hf]`" in report
    assert "| case |" not in report and "comparisons," not in report  # no parity compared: no empty table


def test_failed_trace_gives_its_divergence_in_words() -> None:
    words = "layer 1, q after RoPE (q before RoPE equal): the rotary embedding, h/w axes (packing)"
    run = JUnitRun(Path("parity.xml"), tests=[
        Outcome("parity_tests.test_parity::test_parity[image-x.jpg]", "failed", "FAIL image-x.jpg\nmore",
                    first_divergence=f"image-x.jpg: {words}")])
    report, _ = merge_report([run])
    assert f"(failed, parity.xml): FAIL image-x.jpg (first divergence: image-x.jpg: {words})" in report
