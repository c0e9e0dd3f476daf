"""The same checks on any topology: `-n 1`, `-n 2`, `-n 4` and any `--shard=K/N` run the same tests, the same
sampled checks (determinism, companion swaps, outputs, reference, token order, float32 probe) and the same forwards,
for the CPU's default policies and for a GPU's."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import pytest

from conftest import verdicts
from test_suite import run_total
from test_suite_work import junit_tests
from vitparity.pytest_plugin import SESSION_KEY
from vitparity.suite.cases import Shard
from vitparity.suite.schedule import build_plan, group_needs, leave_out, probed, split_items

EXTRAS = re.compile(r"^(?:main|total): forwards: .*?(?:float32 probe: \d+ loads, (\d+) forwards \((\d+) tokens\).*?)?"
                    r"determinism re-runs (\d+); companion swaps (\d+);", re.M)
WORKERS = (1, 2, 4)
SHARDS = (1, 2, 3)
GPU = {"device": "cuda", "dtype": "bfloat16"}  # the policies' `auto` resolved as on a GPU, and a float32 probe


def extras(output: str) -> tuple[int, ...]:
    """The run's float32 probe forwards and tokens, determinism re-runs and companion swaps (its cost line)."""
    return tuple(int(value or 0) for value in EXTRAS.search(output).groups())


def collected(suite, budget: int) -> list[pytest.Item]:
    """Every test of the suite on the bundled media, none left out by a policy (the policies are applied per
    topology below, as the plugin applies them)."""
    items, _ = suite.pytester.inline_genitems("-p", "no:cacheprovider", "-p", "no:vitparity-inapplicable",
                                              "--device=cpu", f"--pack-tokens={budget}")
    return items


def topology_plan(items: list[pytest.Item], gpu: bool, workers: int, shards: int) -> dict:
    """What the N shards of a run under `-n workers` do together, as the plugin decides it in each process: the
    tests each runs (node id -> how many shards run it), what each pack group computes (its cases, determinism
    re-runs, outputs, reference, token order, float32 probe, pack, companion swap, features from the pack), the
    planned swaps and what the plan leaves out."""
    session = items[0].config.stash[SESSION_KEY]
    settings = replace(session.settings, **(GPU if gpu else {}))
    tests, needs, probes, reasons = Counter(), {}, {}, {}
    for index in range(1, shards + 1):
        mine = replace(settings, shard=Shard(index, shards) if shards > 1 else None)
        plan = build_plan(mine, workers, session._files)
        kept, why, from_pack = leave_out(plan, mine, list(items))
        selection = split_items(plan, mine, kept)
        tests.update(item.nodeid for item in selection.kept)
        needs.update(group_needs(plan, selection, probed(selection.kept, from_pack)))
        probes.update(plan.companions)
        for reason, names in why.items():
            reasons.setdefault(reason, []).extend(names)
    return {"tests": tests, "needs": needs, "probes": probes,
            "left out": {reason: sorted(names) for reason, names in reasons.items()}}


@pytest.mark.parametrize("budget", [1500, 16_384])
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-policies", "gpu-policies"])
def test_every_topology_plans_the_same_checks(suite, budget, gpu) -> None:
    items = collected(suite, budget)
    serial = topology_plan(items, gpu, 1, 1)
    assert set(serial["tests"].values()) == {1} and serial["needs"]
    needs = serial["needs"].values()
    assert sum(len(need.token_order) for need in needs) == 1 and all(need.companions for need in needs)
    # the GPU's policies sample (and take packing features from the packs), a 16-bit run probes one case in float32
    assert all(need.from_pack == gpu for need in needs) and sum(len(need.probe) for need in needs) == int(gpu)
    assert (sum(len(need.determinism) for need in needs) < len(items[0].config.stash[SESSION_KEY].plan.cases)) == gpu
    for workers in WORKERS:
        for shards in SHARDS:
            assert topology_plan(items, gpu, workers, shards) == serial, (workers, shards)


def test_sharded_and_parallel_runs_count_the_forwards_of_a_serial_run(suite) -> None:
    """The GPU's policies on the CPU, in bfloat16 (float32 probe): a serial run, and the same run as two shards, the
    first under -n 2 (one group per worker), compare the same rows and run the same forwards, in total."""
    plan = ("--determinism=sample", "--companions=sample", "--outputs=sample", "--dtype=bfloat16",
            "--pack-tokens=1500", "-m", "not golden")
    serial = suite.run(*plan, "--junitxml=serial.xml")
    first = suite.run(*plan, "--shard=1/2", "-n", "2", "--junitxml=first.xml")
    second = suite.run(*plan, "--shard=2/2", "--junitxml=second.xml")
    assert serial.ret == first.ret == second.ret == 0, second.stdout.str()[-3000:]
    assert "not run by the plan (--companions=sample: packing features come from the pack" in first.stdout.str()
    tests = junit_tests(suite.path / "first.xml") + junit_tests(suite.path / "second.xml")
    assert sorted(tests) == junit_tests(suite.path / "serial.xml")
    rows = verdicts(serial.stdout.str())
    assert {**verdicts(first.stdout.str()), **verdicts(second.stdout.str())} == rows
    assert len(verdicts(first.stdout.str())) + len(verdicts(second.stdout.str())) == len(rows)
    outputs = [run.stdout.str() for run in (serial, first, second)]
    counts = [run_total(out)[:4] + extras(out) for out in outputs]  # forwards and tokens of each kind, checks
    assert counts[0][-3] and counts[0][-2] and counts[0][-1]  # a probe, re-runs and swaps ran
    assert [a + b for a, b in zip(counts[1], counts[2])] == list(counts[0])
