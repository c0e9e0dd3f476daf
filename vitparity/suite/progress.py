"""Progress of a run, per pack group, on pytest's terminal reporter: never silent for long, with `-q` and under xdist.

A group is computed in one go when its first test asks for it (its forwards, on one worker), so its progress is
told at group level: a line when a group's first test report arrives (`pack-1a2b3c4d: 5 cases, 12,345 tokens in
0:41; 3 of 8 pack groups, 40% of the tokens, elapsed 1:02, ETA 1:33`), and, while nothing is reported for
`HEARTBEAT_S`, a line naming the groups in flight and how long each has run. The ETA assumes the time per token of
the groups done so far holds for the rest (forwards dominate and grow about linearly with tokens at these sizes).

Runs in the process that reports (the only process of a serial run, the controller under xdist: its hooks see every
worker's `pytest_runtest_logstart` / `pytest_runtest_logreport`); workers print nothing of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from .schedule import Plan

HEARTBEAT_S = 30.0  # longest silence: a line at least this often while groups run (seconds)


def clock(seconds: float) -> str:
    """Seconds as `m:ss` (`h:mm:ss` past an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Pack-group progress of this shard's groups, written through `write` (a terminal reporter's `write_line`).

    `now` is the clock (seconds; `time.monotonic` by default). Thread-safe: the heartbeat runs in a thread of its
    own."""

    def __init__(self, plan: Plan, write: Callable[[str], None], now: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self.write = write
        self.now = now
        self.tokens = {group.id: group.tokens for group in plan.groups}
        self.cases = {group.id: len(group.cases) for group in plan.groups}
        self.start = now()
        self.started: dict[str, float] = {}  # group id -> when its first test started
        self.done: set[str] = set()
        self.last_line = self.start
        self.lock = threading.Lock()

    def selected(self, nodeids: list[str]) -> None:
        """Only the groups that hold one of the run's selected tests (`-k`, `-m`) are counted from now on."""
        keep = {self.plan.scope_of(nodeid) for nodeid in nodeids}
        with self.lock:
            self.tokens = {group: tokens for group, tokens in self.tokens.items() if group in keep}

    def test_started(self, nodeid: str) -> bool:
        """A test started; returns whether it belongs to one of this shard's pack groups."""
        group = self.plan.scope_of(nodeid)
        with self.lock:
            if group in self.tokens and group not in self.started:
                self.started[group] = self.now()
        return group in self.tokens

    def test_reported(self, nodeid: str) -> None:
        """A test's report arrived: the first of a group means the group's forwards are done."""
        group = self.plan.scope_of(nodeid)
        with self.lock:
            if group not in self.tokens or group in self.done:
                return
            self.done.add(group)
            now = self.now()
            took = now - self.started.get(group, now)
            self._say(f"{group}: {self.cases[group]} cases, {self.tokens[group]:,} tokens in {clock(took)}; {self._overall(now)}")

    def heartbeat(self) -> None:
        """While groups run and nothing was said for HEARTBEAT_S: which groups are in flight and for how long."""
        with self.lock:
            now = self.now()
            if now - self.last_line < HEARTBEAT_S or len(self.done) == len(self.tokens):
                return
            running = [f"{group} ({self.tokens[group]:,} tokens, {clock(now - since)})"
                       for group, since in self.started.items() if group not in self.done]
            if running:
                self._say(f"running {', '.join(running)}; {self._overall(now)}")

    def _overall(self, now: float) -> str:
        total, done = sum(self.tokens.values()), sum(self.tokens[group] for group in self.done)
        elapsed = now - self.start
        eta = f", ETA {clock(elapsed / done * (total - done))}" if done and done < total else ""
        share = f"{100 * done / total:.0f}%" if total else "all"
        return (f"{len(self.done)} of {len(self.tokens)} pack groups, {share} of the tokens, elapsed "
                f"{clock(elapsed)}{eta}")

    def _say(self, text: str) -> None:
        self.last_line = self.now()
        self.write(f"vitparity: {text}")


class ProgressReporter:
    """The pytest plugin that feeds `Progress` and runs its heartbeat thread for the length of the test loop."""

    def __init__(self, plan: Plan, config: pytest.Config) -> None:
        self.plan = plan
        self.config = config
        self.progress: Progress | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or not self.plan.groups:
            return

        def write(line: str) -> None:
            reporter.ensure_newline()
            reporter.write_line(line)

        self.progress = Progress(self.plan, write)
        if session.items:  # a serial run (the xdist controller hears of the selection from its workers)
            self.progress.selected([item.nodeid for item in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids: list[str]) -> None:
        """Under xdist: every worker collects the same selection (the scheduler checks it)."""
        if self.progress is not None:
            self.progress.selected(ids)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S / 3):
            if self.progress is not None:
                self.progress.heartbeat()

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        """The heartbeat starts with the first test of a pack group (a run of other tests, e.g. the project's own
        tests beside the suite's plugin, never hears of it)."""
        if self.progress is not None and self.progress.test_started(nodeid) and self.thread is None:
            self.thread = threading.Thread(target=self._beat, name="vitparity-progress", daemon=True)
            self.thread.start()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.progress is not None:
            self.progress.test_reported(report.nodeid)

    def pytest_sessionfinish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
