"""No green without a check: a run in which every parity test was skipped compared nothing, so it does not pass.

A parity test is one marked `image`, `video` or `packed` (each case's and pack group's tests). When the run
collected some, skipped them all (e.g. `--device=cuda` on a machine without CUDA) and would exit 0, its exit status
becomes 5 (pytest's "no tests ran") and the summary says why; `--allow-skip` keeps 0 for a run that is meant to
skip. A run whose every test was deselected (`-k` matching nothing) already exits 5 in pytest.
"""

from __future__ import annotations

import pytest

PARITY_MARKS = frozenset({"image", "video", "packed"})


class NothingChecked:
    """Counts the parity tests that ran and were skipped (here or reported by the xdist workers)."""

    def __init__(self, allow_skip: bool) -> None:
        self.allow_skip = allow_skip
        self.ran = 0
        self.skipped = 0
        self.failed_run = False  # this plugin turned a 0 into 5

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not PARITY_MARKS & set(report.keywords):
            return
        if report.skipped:
            self.skipped += 1
        elif report.when == "call":
            self.ran += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and not self.ran and session.exitstatus == pytest.ExitCode.OK and not self.allow_skip:
            session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
            self.failed_run = True

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.failed_run:
            terminalreporter.write_sep(
                "=", f"NOTHING CHECKED: all {self.skipped} parity tests were skipped; exit status 5 (pass "
                "--allow-skip when a run is meant to skip)", red=True,
            )
