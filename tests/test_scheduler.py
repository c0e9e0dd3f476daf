"""The pack-group scheduler (xdist's scheduler protocol) with stand-in workers: each group goes whole and in order
to the worker the plan names, workers are kept two tests ahead, the run ends once every group is sent, a group of
a worker that is gone goes to another, and a crashed worker's unfinished tests go back to the queue."""

from __future__ import annotations

import pytest

from vitparity.suite.schedule import PackGroupScheduling

COLLECTION = ["t.py::test_a[g0]", "t.py::test_b[g0]", "t.py::test_a[g1]", "t.py::test_b[g1]", "t.py::test_c[g1]",
              "t.py::test_a[g2]", "t.py::test_b[g2]", "t.py::test_weights"]


class Plan:
    """The two things the scheduler reads of a plan: each group's worker, and the group of a test id."""

    owner = {"g0": 0, "g1": 1, "g2": 0}

    @staticmethod
    def scope_of(nodeid: str) -> str:
        return nodeid.rsplit("[", 1)[1].rstrip("]") if "[" in nodeid else nodeid


class Config:
    def __init__(self, workers: int) -> None:
        self.workers = workers

    def getoption(self, name: str, default=None):
        return [f"{self.workers}*popen"] if name == "tx" else default


class Gateway:
    def __init__(self, name: str) -> None:
        self.id = name


class Worker:
    """A stand-in xdist worker: records what it is sent."""

    def __init__(self, name: str) -> None:
        self.gateway = Gateway(name)
        self.sent: list[int] = []
        self.shutting_down = False

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(indices)


def started(workers: int) -> tuple[PackGroupScheduling, list[Worker]]:
    sched = PackGroupScheduling(Config(workers), Plan())
    nodes = [Worker(f"gw{i}") for i in range(workers)]
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        assert not sched.collection_is_completed
        sched.add_node_collection(node, COLLECTION)
    assert sched.collection_is_completed
    sched.schedule()
    return sched, nodes


def run_all(sched: PackGroupScheduling, nodes: list[Worker]) -> None:
    """Complete tests as a worker does (the oldest first, the last one only once the run is finished)."""
    done = {node: 0 for node in nodes}
    while not sched.tests_finished:
        node = next(n for n in nodes if len(n.sent) - done[n] >= 2)
        sched.mark_test_complete(node, node.sent[done[node]])
        done[node] += 1


def test_groups_go_whole_to_their_worker() -> None:
    sched, (gw0, gw1) = started(2)
    run_all(sched, [gw0, gw1])
    names = {node: [COLLECTION[i] for i in node.sent] for node in (gw0, gw1)}
    assert [Plan.scope_of(n) for n in names[gw0] if "[" in n] == ["g0", "g0", "g2", "g2"]
    assert [Plan.scope_of(n) for n in names[gw1] if "[" in n] == ["g1", "g1", "g1"]
    assert sorted(gw0.sent + gw1.sent) == list(range(len(COLLECTION)))  # every test once


def test_a_missing_workers_groups_go_to_another() -> None:
    sched, (gw0,) = started(1)  # the plan was made for two workers: gw1 never started
    run_all(sched, [gw0])
    assert sorted(gw0.sent) == list(range(len(COLLECTION)))


def test_a_crashed_workers_rest_goes_back_to_the_queue() -> None:
    sched, (gw0, gw1) = started(2)
    first = gw1.sent[0]
    crashed_in = sched.remove_node(gw1)
    assert crashed_in == COLLECTION[first]
    run_all(sched, [gw0])
    assert sorted(gw0.sent) == sorted(set(range(len(COLLECTION))) - {first})  # the rest of g1 ran on gw0


def test_workers_must_collect_the_same() -> None:
    sched = PackGroupScheduling(Config(2), Plan())
    gw0, gw1 = Worker("gw0"), Worker("gw1")
    sched.add_node(gw0)
    sched.add_node(gw1)
    sched.add_node_collection(gw0, COLLECTION)
    with pytest.raises(RuntimeError, match="gw1 collected other tests"):
        sched.add_node_collection(gw1, COLLECTION[:-1])
