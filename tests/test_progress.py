"""Pack-group progress: a line per group as it completes (cases, tokens, time, share, ETA), a heartbeat while
groups run, and the suite never silent for longer than the heartbeat with -q and under xdist."""

from __future__ import annotations

import pytest

from vitparity.suite import progress
from vitparity.suite.cases import PackGroup, ParityCase
from vitparity.suite.progress import HEARTBEAT_S, Progress, clock


class FakePlan:
    """Two groups of 100 and 300 tokens; node ids name their group as `test_x[<group>]`."""

    def __init__(self) -> None:
        self.groups = tuple(PackGroup(name, tuple(FakeCase(n) for n in sizes), budget=1000)
                            for name, sizes in (("pack-a", (40, 60)), ("pack-b", (300,))))

    def scope_of(self, nodeid: str) -> str:
        return nodeid.split("[")[-1].rstrip("]") if "[" in nodeid else nodeid


class FakeCase:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens


def test_clock() -> None:
    assert [clock(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]


def test_a_line_per_group_with_share_and_eta_and_a_heartbeat_while_silent() -> None:
    now = [0.0]
    lines: list[str] = []
    state = Progress(FakePlan(), lines.append, now=lambda: now[0])
    state.test_started("t.py::test_packed[pack-a]")
    now[0] = HEARTBEAT_S - 1
    state.heartbeat()
    assert lines == []  # not yet silent for the heartbeat's span
    now[0] = HEARTBEAT_S + 1
    state.heartbeat()
    assert lines == [f"vitparity: running pack-a (100 tokens, 0:31); 0 of 2 pack groups, 0% of the tokens, elapsed 0:31"]
    now[0] = 40.0
    state.test_reported("t.py::test_packed[pack-a]")
    state.test_reported("t.py::test_companions[pack-a]")  # the group's later tests add nothing
    state.test_reported("t.py::test_loaded_weights")  # outside any group
    assert lines[1:] == ["vitparity: pack-a: 2 cases, 100 tokens in 0:40; 1 of 2 pack groups, 25% of the tokens, "
                         "elapsed 0:40, ETA 2:00"]
    state.test_started("t.py::test_packed[pack-b]")
    now[0] = 100.0
    state.test_reported("t.py::test_packed[pack-b]")
    assert lines[-1] == ("vitparity: pack-b: 1 cases, 300 tokens in 1:00; 2 of 2 pack groups, 100% of the tokens, "
                         "elapsed 1:40")
    now[0] = 1000.0
    state.heartbeat()  # every group done: nothing more to say
    assert len(lines) == 3


def test_only_the_groups_of_selected_tests_count() -> None:
    lines: list[str] = []
    state = Progress(FakePlan(), lines.append, now=lambda: 10.0)
    state.selected(["t.py::test_packed[pack-b]", "t.py::test_loaded_weights"])
    state.test_reported("t.py::test_packed[pack-b]")
    assert lines == ["vitparity: pack-b: 1 cases, 300 tokens in 0:00; 1 of 1 pack groups, 100% of the tokens, "
                     "elapsed 0:00"]


def test_no_heartbeat_before_a_group_runs() -> None:
    """A run whose tests are not the suite's (its plugin loaded beside other tests) never hears of progress."""
    now = [1000.0]
    lines: list[str] = []
    state = Progress(FakePlan(), lines.append, now=lambda: now[0])
    assert not state.test_started("tests/test_other.py::test_x")
    now[0] += 10 * HEARTBEAT_S
    state.heartbeat()
    assert lines == []


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_the_suite_says_each_group_and_beats_under_q(suite, monkeypatch, workers) -> None:
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.3)
    result = suite.run("-q", "-m", "not golden", "-k", "coffee or rocket", *workers)
    out = result.stdout.str()
    assert result.ret == 0, out[-3000:]
    # under -q a line may follow the progress dots on the same line
    done = [line.split("vitparity: ", 1)[1] for line in out.splitlines() if "vitparity: pack-" in line]
    assert done and all(" tokens in " in line and " pack groups, " in line for line in done), out[-3000:]
    assert f"{len(done)} of {len(done)} pack groups, 100% of the tokens" in done[-1]  # only the selected groups
    assert "vitparity: running pack-" in out, out[-3000:]
