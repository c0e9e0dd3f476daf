"""The parity report of several suite runs (shards, runners) merged from their JUnit XML files, as Markdown.

A suite run written with `--junitxml` holds, per test, its comparison rows (user property `vitparity`, one JSON
`Comparison.row()` each) and, per file, the cost of each of its processes (global properties
`vitparity_cost_<worker>`, JSON) the config differences of the two models (`vitparity_config_warnings`) and the code that ran each model
(`vitparity_code`: class and files with their sha256).
`vitparity report-junit` reads those files and prints one table of every comparison, the failed tests, tests
found in more than one file (shards that overlap), the config warnings and the cost lines.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .compare import comparison_from_row
from .report import TABLE_HEADER, table_cells
from .features_io import code_line
from .suite.costs import CODE_KEY, COST_KEY, PROPERTY, WARNINGS_KEY, cost_details, cost_line, total_cost

BAD_OUTCOMES = ("failed", "error")


class JUnitError(ValueError):
    """A file that cannot be read as the JUnit XML of a suite run."""


@dataclass(frozen=True)
class TestOutcome:
    id: str  # module::name[params], as pytest names the test
    outcome: str  # passed, failed, error or skipped
    message: str = ""


@dataclass
class JUnitRun:
    """One JUnit file: its tests, comparison rows and per-process costs."""

    path: Path
    tests: list[TestOutcome] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    costs: dict[str, dict] = field(default_factory=dict)  # worker -> Cost.to_dict()
    config_warnings: list[str] = field(default_factory=list)
    code: dict[str, dict] = field(default_factory=dict)  # side -> `checkpoint_code.CodeRecord.to_dict()`


def _outcome(case: ET.Element) -> tuple[str, str]:
    for tag, outcome in (("error", "error"), ("failure", "failed"), ("skipped", "skipped")):
        found = case.find(tag)
        if found is not None:
            return outcome, (found.get("message") or found.text or "").strip()
    return "passed", ""


def read_junit(path: str | Path) -> JUnitRun:
    """Parse one JUnit XML file of a suite run; JUnitError names the file and what is wrong with it."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise JUnitError(f"{path}: no such file") from None
    except (ET.ParseError, OSError) as err:
        raise JUnitError(f"{path}: not readable as JUnit XML ({err})") from None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite") if root.tag == "testsuites" else []
    if not suites:
        raise JUnitError(f"{path}: not JUnit XML (root element <{root.tag}>, expected <testsuites> or <testsuite>)")
    run = JUnitRun(path)
    for suite in suites:
        for prop in suite.findall("properties/property"):
            name = prop.get("name", "")
            if name.startswith(COST_KEY + "_"):
                run.costs[name[len(COST_KEY) + 1:]] = _json(prop.get("value", ""), path, name)
            elif name == WARNINGS_KEY:
                run.config_warnings += _json(prop.get("value", ""), path, name)
            elif name == CODE_KEY:
                run.code = _json(prop.get("value", ""), path, name)
        for case in suite.iter("testcase"):
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            run.tests.append(TestOutcome(test_id, *_outcome(case)))
            for prop in case.findall("properties/property"):
                if prop.get("name") == PROPERTY:
                    run.rows.append(_json(prop.get("value", ""), path, test_id))
    return run


def _json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JUnitError(f"{path}: property of {where} is not JSON ({err})") from None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def merge_report(runs: Sequence[JUnitRun]) -> tuple[str, bool]:
    """The Markdown report of the runs together, and whether they pass: no test failed or errored, none ran in
    two files, and at least one test ran."""
    tests = [(run.path.name, test) for run in runs for test in run.tests]
    seen: dict[str, list[str]] = {}
    for name, test in tests:
        seen.setdefault(test.id, []).append(name)
    twice = {test_id: names for test_id, names in seen.items() if len(names) > 1}
    bad = [(name, test) for name, test in tests if test.outcome in BAD_OUTCOMES]
    comparisons = [comparison_from_row(row) for run in runs for row in run.rows]
    counts = {o: sum(t.outcome == o for _, t in tests) for o in ("passed", "failed", "error", "skipped")}
    passed = bool(tests) and not bad and not twice

    lines = ["## vitparity parity report", ""]
    lines.append(f"{'PASS' if passed else 'FAIL'}: {len(tests)} tests from {len(runs)} JUnit files: "
                 + ", ".join(f"{counts[o]} {o}" for o in counts) + ".")
    codes = {(run.path.name, side): json.dumps(code, sort_keys=True) for run in runs for side, code in run.code.items()}
    for side in ("hf", "packing"):
        seen_code = list(dict.fromkeys(text for (_, which), text in codes.items() if which == side))
        for text in seen_code:
            files = [name for (name, which), other in codes.items() if which == side and other == text]
            where = f" ({', '.join(files)})" if len(seen_code) > 1 else ""
            lines += ["", f"Code checked, {side}{where}: {_cell(code_line(json.loads(text)))}"]
    lines += ["", "| " + " | ".join(TABLE_HEADER) + " |", "|---|" + "---:|" * 5 + "---|"]
    for c in comparisons:
        lines.append("| " + " | ".join(_cell(cell) for cell in table_cells(c, case_width=80, verdict_width=200)) + " |")
    failed_comparisons = sum(not c.passed for c in comparisons)
    lines += ["", f"{len(comparisons)} comparisons, {len(comparisons) - failed_comparisons} passed, "
                  f"{failed_comparisons} failed."]
    if not tests:
        lines += ["", "No test ran in any file."]
    if bad:
        lines += ["", f"### Failed tests ({len(bad)})", ""]
        lines += [f"- `{test.id}` ({test.outcome}, {name}): {_cell(test.message.splitlines()[0] if test.message else '')}"
                  for name, test in bad]
    if twice:
        lines += ["", f"### Tests run in more than one file ({len(twice)}): the shards overlap", ""]
        lines += [f"- `{test_id}`: {', '.join(names)}" for test_id, names in sorted(twice.items())]
    warnings = list(dict.fromkeys(w for run in runs for w in run.config_warnings))
    if warnings:
        lines += ["", f"### Config differences ({len(warnings)})", ""]
        lines += [f"- {_cell(str(warning))}" for warning in warnings]
    costs = {f"{run.path.name} {worker}": cost for run in runs for worker, cost in sorted(run.costs.items())}
    if costs:
        lines += ["", "### Cost", ""]
        lines += [f"- {label}: {cost_line(cost)}; {cost_details(cost)}" for label, cost in costs.items()]
        total = total_cost(costs)
        lines.append(f"- total: {cost_line(total)}; {cost_details(total)}")
    return "\n".join(lines) + "\n", passed
