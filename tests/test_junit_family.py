"""The suite's JUnit XML under pytest's default junit_family (xunit2), as `vitparity gate` and
`pytest -p vitparity.pytest_plugin --pyargs vitparity.parity_tests --junitxml=...` run it: no ini file sets the family,
no PytestWarning is raised, and the per-test figures still reach the report."""

from __future__ import annotations

import json
import re

import pytest

from vitparity.cli import main


def test_junit_without_ini_warns_nothing_and_keeps_the_figures(suite, capsys: pytest.CaptureFixture[str]) -> None:
    (suite.path / "pyproject.toml").unlink()  # no ini file: pytest's default junit_family, xunit2
    result = suite.run("parity_tests", "-W", "error::pytest.PytestWarning", "--junitxml=junit.xml",
                       "-k", "test_companions_do_not_leak or (test_parity and image-coffee)")
    out = result.stdout.str()
    assert result.ret == 0, out
    assert "junit_family" not in out and "PytestWarning" not in out
    xml = (suite.path / "junit.xml").read_text()
    rows = [json.loads(m.replace("&quot;", '"')) for m in re.findall(r'name="vitparity" value="([^"]*)"', xml)]
    assert rows and rows[0]["name"] == "image-coffee_small.jpg" and rows[0]["passed"] is True
    assert 'name="companion_swap[' in xml  # the figures each companion swap records
    assert main(["report-junit", str(suite.path / "junit.xml")]) == 0
    assert "image-coffee_small.jpg" in capsys.readouterr().out
