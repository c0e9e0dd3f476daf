"""What an update of the goldens (`--snapshot-update`, `--regenerate-goldens`) does with goldens it does not
replace: it keeps them, and deletes only those whose case is gone.

syrupy would delete every golden its run did not assert: also those of a case whose media could not be decoded
(a half-synced file, a codec the runner lacks), whose parity failed or that a filter left out. While updating, the
suite turns syrupy's deletion off (`--snapshot-no-cleanup`) and decides here, in the process that sees every test
report (the only process, or the xdist controller):

- a golden of a case whose golden test errored, failed, was refused, skipped or not selected is kept, with that
  reason in the summary;
- a golden whose file names no case of the collection (its media file was removed or renamed) is deleted, only
  when the run was neither narrowed (-k, -m, node ids, --deselect, --lf, --shard) nor stopped early: every case
  had its golden tests run. Otherwise it is kept and the summary says why.

An update in which a case errored exits non-zero (its tests fail) and the summary names the case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..snapshots import golden_file_stem
from .session import ParitySession

FOLDER_PROPERTY = "vitparity_golden_folder"  # user property of a golden test: its golden folder


@dataclass(frozen=True)
class GoldenAction:
    path: Path
    reason: str


@dataclass
class UpkeepResult:
    deleted: list[GoldenAction] = field(default_factory=list)
    kept: list[GoldenAction] = field(default_factory=list)
    deselected: list[GoldenAction] = field(default_factory=list)
    errored: list[str] = field(default_factory=list)  # case ids whose goldens could not be replaced for an error
    narrowed_by: list[str] = field(default_factory=list)


def narrowing(config: pytest.Config, session: ParitySession) -> list[str]:
    """What keeps this run from being a full, unfiltered collection ([] when nothing does)."""
    option = config.option
    found = []
    if session.settings.shard is not None:
        found.append("--shard")
    if getattr(option, "keyword", ""):
        found.append(f"-k {option.keyword!r}")
    if getattr(option, "markexpr", ""):
        found.append(f"-m {option.markexpr!r}")
    if getattr(option, "deselect", None):
        found.append("--deselect")
    if getattr(option, "lf", False):
        found.append("--lf")
    if any("::" in str(arg) for arg in config.args):
        found.append("node ids")
    return found


def golden_key(nodeid: str) -> tuple[str, str]:
    """(test module stem, golden file stem) of a golden test's node id: where syrupy keeps its golden
    (<golden folder>/<module stem>/<file stem>.npz)."""
    module, _, rest = nodeid.partition("::")
    return Path(module).stem, golden_file_stem(rest.rsplit("::", 1)[-1])


def case_of_file(stem: str, case_stems: dict[str, str]) -> str | None:
    """The case id a golden file stem (`test_golden[<case>-<side>]`) belongs to, None when no case has that name.
    `case_stems`: golden_file_stem(case id) -> case id."""
    param = stem.partition("[")[2].removesuffix("]")
    for case_stem in sorted(case_stems, key=len, reverse=True):
        if param == case_stem or param.startswith(case_stem + "-"):
            return case_stems[case_stem]
    return None


def _failure_line(report: pytest.TestReport) -> str:
    """The first line that says why a golden test did not pass."""
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, message)
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    lines = [line.strip() for line in (crash.message if crash else report.longreprtext).splitlines() if line.strip()]
    if len(lines) > 1 and ": golden in " in lines[0]:  # the golden fixture's header: the reason follows
        lines = lines[1:]
    return lines[0].removeprefix("Failed: ") if lines else report.outcome


class GoldenUpkeep:
    """Plugin of the updating process that sees every report: keeps, deletes and lists goldens."""

    def __init__(self, session: ParitySession) -> None:
        self.session = session
        self.folders: set[Path] = set()
        self.outcomes: dict[tuple[str, str], tuple[str, str]] = {}  # golden key -> (verdict, reason)
        self.result: UpkeepResult | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "golden" not in report.keywords:
            return
        self.folders.update(Path(json.loads(value)) for name, value in report.user_properties
                            if name == FOLDER_PROPERTY)
        key = golden_key(report.nodeid)
        if key in self.outcomes and self.outcomes[key][0] != "passed":
            return  # the first phase that did not pass says why
        if report.failed:
            line = _failure_line(report)
            verdict = "errored" if report.when != "call" else "refused" if "refusing" in line else "failed"
            self.outcomes[key] = (verdict, line)
        elif report.skipped:
            self.outcomes[key] = ("skipped", _failure_line(report))
        elif key not in self.outcomes:
            self.outcomes[key] = ("passed", "")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.result = self.upkeep(session.config)
        if self.result.errored and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def upkeep(self, config: pytest.Config) -> UpkeepResult:
        """Delete the goldens whose case is gone (full runs only); return what was deleted and kept, and why."""
        cases = self.session.plan.cases
        case_stems = {golden_file_stem(case.id): case.id for case in cases}
        result = UpkeepResult(narrowed_by=narrowing(config, self.session))
        ran_cases = {case_of_file(stem, case_stems) for _, stem in self.outcomes}
        if not result.narrowed_by and not ran_cases >= {case.id for case in cases}:
            result.narrowed_by.append("not every case's golden tests ran")
        errored = set()
        for folder in sorted(self.folders):
            for path in sorted(folder.glob("*/*.npz")):
                key = (path.parent.name, path.stem)
                case = case_of_file(path.stem, case_stems)
                verdict, reason = self.outcomes.get(key, ("", ""))
                if verdict == "passed":
                    continue
                if verdict:
                    result.kept.append(GoldenAction(path, f"{verdict}: {reason}"))
                    if verdict == "errored":
                        errored.add(case)
                elif case is not None:
                    result.deselected.append(GoldenAction(path, "its test was not selected in this run"))
                elif result.narrowed_by:
                    result.kept.append(GoldenAction(path, "no case of this collection has this name; kept because "
                                                          f"the run is narrowed ({', '.join(result.narrowed_by)})"))
                else:
                    path.unlink()
                    result.deleted.append(GoldenAction(path, "no media file of this collection gives its case"))
        result.errored = sorted(c for c in errored if c is not None)
        return result

    def pytest_terminal_summary(self, terminalreporter) -> None:
        result = self.result
        if result is None:
            return
        write = terminalreporter.write_line
        root = terminalreporter.config.rootpath
        terminalreporter.write_sep("=", "vitparity golden update")

        def shown(path: Path) -> str:
            return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

        for action in result.deleted:
            write(f"deleted {shown(action.path)}: {action.reason}", yellow=True)
        for action in result.kept:
            write(f"kept {shown(action.path)}: {action.reason}")
        if result.deselected:
            write(f"kept {len(result.deselected)} goldens of cases this run did not select"
                  + ("" if terminalreporter.verbosity > 0 else " (-v lists them)"))
            if terminalreporter.verbosity > 0:
                for action in result.deselected:
                    write(f"kept {shown(action.path)}: {action.reason}")
        if not (result.deleted or result.kept or result.deselected):
            write("nothing deleted or kept: every golden of the folders this update wrote belongs to a case it ran")
        if result.errored:
            write(f"update incomplete: {len(result.errored)} case(s) errored, their goldens were kept, not "
                  f"replaced: {', '.join(result.errored)}", red=True)
