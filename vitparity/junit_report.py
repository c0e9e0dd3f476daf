"""The parity report of several suite runs (shards, runners) merged from their JUnit XML files, as Markdown.

A suite run written with `--junitxml` holds, per test, its comparison rows (user property `vitparity`, one JSON
`Comparison.row()` each) and, per file, the cost of each of its processes (global properties
`vitparity_cost_<worker>`, JSON) the config differences of the two models (`vitparity_config_warnings`) and the code that ran each model
(`vitparity_code`: class and files with their sha256). A golden test records its golden's state
(`vitparity_golden_state`: match, regression or missing; why a missing one is missing: `vitparity_golden_missing`) and
a file the command that writes the missing goldens (`vitparity_goldens`).
`vitparity report-junit` reads those files and prints one table of every comparison, the failed tests, the missing
goldens apart from them (counted, why, and the command that writes them), tests found in more than one file (shards
that overlap), the config warnings and the cost lines.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .compare import comparison_from_row
from .features_io import code_line
from .report import TABLE_HEADER, table_cells, worst_case_line, worst_first
from .suite.costs import BASELINE_PROPERTY as BASELINE_KEY
from .suite.costs import CODE_KEY, COST_KEY, PROPERTY, WARNINGS_KEY, cost_details, cost_line, total_cost
from .suite.golden_state import MATCH, MISSING, MISSING_PROPERTY, REGRESSION, STATE_PROPERTY, SUMMARY_PROPERTY, GoldenTally
from .suite.run_record import RUN_KEY, run_lines

BAD_OUTCOMES = ("failed", "error")


class JUnitError(ValueError):
    """A file that cannot be read as the JUnit XML of a suite run."""


def add_suite_properties(path: Path, properties: Sequence[tuple[str, str]]) -> None:
    """Append global properties (`<testsuite><properties><property name= value=>`, the JUnit layout pytest's
    `record_testsuite_property` writes) to every test suite of the JUnit XML file at `path`.

    Raises JUnitError when the file cannot be read as JUnit XML.
    """
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as err:
        raise JUnitError(f"{path}: not readable as JUnit XML ({err})") from None
    root = tree.getroot()
    for suite in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        props = suite.find("properties")
        if props is None:
            props = ET.Element("properties")
            suite.insert(0, props)
        for name, value in properties:
            ET.SubElement(props, "property", name=name, value=value)
    tree.write(path, encoding="utf-8", xml_declaration=True)


@dataclass(frozen=True)
class TestOutcome:
    id: str  # module::name[params], as pytest names the test
    outcome: str  # passed, failed, error or skipped
    message: str = ""
    worst: dict | None = None  # the comparison row of this test with the lowest min cosine
    first_divergence: str = ""  # "<trace name>: <divergence in words>" of each layer trace this test recorded
    golden: list[tuple[str, str]] = field(default_factory=list)  # a golden test's state properties (golden_state)

    def reason(self) -> str:
        """Why it failed, in one line: the first line of its message; for a golden regression every line of it (what
        changed in provenance, the bar and the figure that failed it)."""
        lines = [line.strip().lstrip("- ") for line in self.message.splitlines() if line.strip()]
        return "; ".join(lines) if dict(self.golden).get(STATE_PROPERTY) == REGRESSION else (lines or [""])[0]

    @property
    def missing_golden(self) -> bool:
        """A golden test that failed because its golden is missing (counted apart from failed tests)."""
        return dict(self.golden).get(STATE_PROPERTY) == MISSING

    def evidence(self) -> str:
        """`worst cos 0.912345 (packed/image-x.jpg); first divergence: ...` ("" when the test recorded neither)."""
        parts = []
        if self.worst is not None:
            cos = self.worst.get("min_cos")
            parts.append(f"worst cos {'n/a' if cos is None else format(cos, '.6f')} ({self.worst.get('name')})")
        if self.first_divergence:
            parts.append(f"first divergence: {self.first_divergence}")
        return "; ".join(parts)


@dataclass
class JUnitRun:
    """One JUnit file: its tests, comparison rows and per-process costs."""

    path: Path
    tests: list[TestOutcome] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    costs: dict[str, dict] = field(default_factory=dict)  # worker -> Cost.to_dict()
    config_warnings: list[str] = field(default_factory=list)
    baseline: list[dict] = field(default_factory=list)  # BaselineRow of each golden test (--golden-baseline)
    record: dict = field(default_factory=dict)  # what ran (suite.run_record)
    code: dict[str, dict] = field(default_factory=dict)  # side -> `checkpoint_code.CodeRecord.to_dict()`
    golden_command: str = ""  # the command that writes the run's missing goldens (`golden_state.update_command`)


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
            elif name == RUN_KEY:
                run.record = _json(prop.get("value", ""), path, name)
            elif name == CODE_KEY:
                run.code = _json(prop.get("value", ""), path, name)
            elif name == SUMMARY_PROPERTY:
                run.golden_command = _json(prop.get("value", ""), path, name).get("command", "")
        for case in suite.iter("testcase"):
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            rows, divergences, golden = [], [], []
            for prop in case.findall("properties/property"):
                name, value = prop.get("name", ""), prop.get("value", "")
                if name in (STATE_PROPERTY, MISSING_PROPERTY):
                    golden.append((name, value))
                elif name == PROPERTY:
                    rows.append(_json(value, path, test_id))
                elif name == BASELINE_KEY:
                    run.baseline.append(_json(value, path, test_id))
                elif name.startswith("trace[") and name.endswith("] divergence") and value != "none":
                    divergences.append(f"{name[len('trace['):-len('] divergence')]}: {value}")
            worst = min(rows, key=_row_badness) if rows else None
            run.tests.append(TestOutcome(test_id, *_outcome(case), worst, "; ".join(divergences), golden))
            run.rows += rows
    return run


def _row_badness(row: dict) -> tuple[bool, float]:
    cos = row.get("min_cos")
    return bool(row.get("passed")), -float("inf") if cos is None else cos


def _json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JUnitError(f"{path}: property of {where} is not JSON ({err})") from None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _drift_badness(row: dict) -> tuple[bool, bool, float, str]:
    """Failed rows first, then rows without figures (no baseline golden), then by ascending min cosine."""
    cos = row.get("min_cos")
    return bool(row.get("passed", True)), cos is not None, -1.0 if cos is None else cos, row.get("case", "")


def _drift_verdict(row: dict) -> str:
    if row.get("problem"):
        return row["problem"]
    if row.get("limit") is None:
        return "report only"
    return f"{'PASS' if row.get('passed', True) else 'FAIL'} (min cos > {row['limit']})"


def _drift_line(row: dict) -> str:
    return (f"largest baseline drift: {row['side']}/{row['case']} min cos {_fmt(row.get('min_cos'), '.6f')}, max "
            f"norm drift {_fmt(row.get('max_norm_rel'), '.3e')}" + (f" ({row['problem']})" if row.get("problem") else ""))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def merge_report(runs: Sequence[JUnitRun]) -> tuple[str, bool]:
    """The Markdown report of the runs together, and whether they pass: no test failed or errored (a missing
    golden fails its test: counted apart, it still fails the runs), none ran in two files, and at least one test
    ran."""
    tests = [(run.path.name, test) for run in runs for test in run.tests]
    seen: dict[str, list[str]] = {}
    for name, test in tests:
        seen.setdefault(test.id, []).append(name)
    twice = {test_id: names for test_id, names in seen.items() if len(names) > 1}
    bad = [(name, test) for name, test in tests if test.outcome in BAD_OUTCOMES]
    missing = [(name, test) for name, test in bad if test.missing_golden]
    comparisons = [comparison_from_row(row) for run in runs for row in run.rows]
    counts = {o: sum(t.outcome == o and not t.missing_golden for _, t in tests) for o in ("passed", "failed", "error",
                                                                                        "skipped")}
    counts = {"passed": counts.pop("passed"), "failed": counts.pop("failed"), "missing goldens": len(missing), **counts}
    passed = bool(tests) and not bad and not twice
    goldens = GoldenTally()
    for _, test in tests:
        goldens.add_properties(test.golden)
    bad = [item for item in bad if not item[1].missing_golden]

    comparisons = worst_first(comparisons)
    baseline = sorted((row for run in runs for row in run.baseline), key=_drift_badness)
    lines = ["## vitparity parity report", ""]
    lines.append(f"{'PASS' if passed else 'FAIL'}: {len(tests)} tests from {len(runs)} JUnit files: "
                 + ", ".join(f"{counts[o]} {o}" for o in counts) + ".")
    if comparisons:
        lines += ["", _cell(worst_case_line(comparisons))]
    if goldens.states:
        lines += ["", _cell(goldens.count_line())]
    if baseline:
        lines += ["", _cell(_drift_line(baseline[0]))]
    records = list(dict.fromkeys(json.dumps(run.record, sort_keys=True) for run in runs if run.record))
    if records:
        lines += ["", "### What ran", ""]
        for record in records:
            lines += [_cell(line) for line in run_lines(json.loads(record))]
    codes = {(run.path.name, side): json.dumps(code, sort_keys=True) for run in runs for side, code in run.code.items()}
    for side in ("hf", "packing"):
        seen_code = list(dict.fromkeys(text for (_, which), text in codes.items() if which == side))
        for text in seen_code:
            files = [name for (name, which), other in codes.items() if which == side and other == text]
            where = f" ({', '.join(files)})" if len(seen_code) > 1 else ""
            lines += ["", f"Code checked, {side}{where}: {_cell(code_line(json.loads(text)))}"]
    if comparisons:  # a run that compared no parity (e.g. -m golden) has no table
        lines += ["", "| " + " | ".join(TABLE_HEADER) + " |", "|---|" + "---:|" * (len(TABLE_HEADER) - 2) + "---|"]
        for c in comparisons:
            lines.append("| " + " | ".join(_cell(cell) for cell in table_cells(c, case_width=80, verdict_width=200))
                         + " |")
        failed_comparisons = sum(not c.passed for c in comparisons)
        lines += ["", f"{len(comparisons)} comparisons, {len(comparisons) - failed_comparisons} passed, "
                      f"{failed_comparisons} failed.", _cell(worst_case_line(comparisons))]
    if not tests:
        lines += ["", "No test ran in any file."]
    if bad:
        lines += ["", f"### Failed tests ({len(bad)})", ""]
        bad = sorted(bad, key=lambda item: (item[1].worst is None, *_row_badness(item[1].worst or {})))
        for name, test in bad:
            first = _cell(test.reason())
            evidence = test.evidence()
            lines.append(f"- `{test.id}` ({test.outcome}, {name}): {first}" + (f" ({_cell(evidence)})" if evidence else ""))
    if missing:
        command = "; ".join(dict.fromkeys(run.golden_command for run in runs if run.golden_command))
        lines += ["", f"### Missing goldens ({len(missing)})", "", _cell(goldens.missing_line(command))]
    matched = [test.id for _, test in tests if dict(test.golden).get(STATE_PROPERTY) == MATCH]
    if matched:
        lines += ["", f"### Goldens checked and matching ({len(matched)})", ""]
        lines += [f"- `{test_id}`" for test_id in matched]
    if baseline:
        lines += ["", f"### Baseline drift ({len(baseline)} goldens against the previous release's; per token, "
                      "float32 figures)", "",
                  "| case | side | tokens | min cos | mean cos | max norm drift | verdict |", "|---|---|---:|---:|---:|---:|---|"]
        for row in baseline:
            lines.append(f"| {_cell(row['case'])} | {row['side']} | {row['tokens']} | {_fmt(row.get('min_cos'), '.6f')} | "
                         f"{_fmt(row.get('mean_cos'), '.6f')} | {_fmt(row.get('max_norm_rel'), '.3e')} | "
                         f"{_cell(_drift_verdict(row))} |")
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
