"""The suite's work split end to end: pack-group budgets, shards, xdist workers, the determinism policy."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import golden_files, verdicts
from faults import build_variant
from test_suite import costs, run_total

SMALL_BUDGET = "--pack-tokens=1500"  # splits the bundled cases into several groups


def junit_tests(path: Path) -> list[str]:
    """classname::name of every test case a JUnit XML file reports as run (passed or failed, not skipped)."""
    cases = ET.parse(path).getroot().iter("testcase")
    return sorted(f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("skipped") is None)


def test_shards_are_disjoint_and_together_exactly_the_full_run(suite) -> None:
    full = suite.run(SMALL_BUDGET, "--junitxml=full.xml")
    assert full.ret == 0
    everything = junit_tests(suite.path / "full.xml")
    shards = []
    for k in (1, 2, 3):
        result = suite.run(SMALL_BUDGET, f"--shard={k}/3", f"--junitxml=shard{k}.xml")
        assert result.ret == 0, result.stdout.str()[-3000:]  # the goldens of other shards are not unused
        assert f"shard {k}/3: " in result.stdout.str()
        shards.append(junit_tests(suite.path / f"shard{k}.xml"))
    # Every test runs in exactly one shard, test_token_order too: the run's one shuffled codec-style case
    # (vitparity.suite.cases.token_order_cases) is checked by the shard that holds it.
    ran = [t for s in shards for t in s]
    assert len(ran) == len(set(ran)) and sorted(ran) == everything
    assert sum(t.startswith("parity_tests.test_paths::test_token_order[codec-") for t in everything) == 1
    assert sum(bool(s) for s in shards) >= 2


def test_snapshot_update_in_a_shard_writes_only_its_own_goldens(suite) -> None:
    before = suite.goldens()
    for path in suite.golden_root.rglob("*.npz"):
        path.unlink()
    result = suite.run(SMALL_BUDGET, "--shard=2/3", "--snapshot-update", "--junitxml=shard.xml")
    assert result.ret == 0
    ran = {re.search(r"test_golden\[(.*)\]", t).group(1) for t in junit_tests(suite.path / "shard.xml")
           if "test_golden[" in t}
    written = golden_files(suite.golden_root)
    assert ran and {re.search(r"test_golden\[(.*)\]", name).group(1) for name in written} == ran
    assert set(written) < set(before)  # the same model's folders, only this shard's cases


def test_shards_without_work_pass(suite) -> None:
    """More shards than groups (a CI matrix larger than the media set): the empty shards pass."""
    groups = len(builtin_plan()[4])  # the pack groups of the bundled media at the CPU's budget
    shards = groups + 2  # two more shards than groups: at least two of them hold no group
    results = [suite.run(f"--shard={k}/{shards}", "-m", "not golden") for k in range(1, shards + 1)]
    assert [r.ret for r in results] == [0] * shards
    assert sum(f"0 of {groups} pack groups" in r.stdout.str() for r in results) >= 2


def test_forwards_and_tokens_are_the_same_serial_and_under_xdist(suite) -> None:
    serial = suite.run(SMALL_BUDGET, "-m", "not golden")
    parallel = suite.run(SMALL_BUDGET, "-m", "not golden", "-n", "3")
    assert serial.ret == parallel.ret == 0
    # The same rows (the run's one shuffled codec-style case: 3 token-order rows) and the same forwards and tokens.
    serial_rows, parallel_rows = verdicts(serial.stdout.str()), verdicts(parallel.stdout.str())
    assert serial_rows == parallel_rows and sum(row.startswith("order~") for row in serial_rows) == 3
    assert run_total(parallel.stdout.str())[:4] == run_total(serial.stdout.str())[:4]
    workers = {w: c for w, c in costs(parallel.stdout.str()).items() if w.startswith("gw")}
    assert len(workers) == 3 and sum(c[0] > 0 for c in workers.values()) >= 2  # the groups were spread


def test_over_budget_cases_still_pack_in_pairs_and_are_named(suite) -> None:
    result = suite.run("--pack-tokens=100", "-m", "not golden")
    assert result.ret == 0
    out = result.stdout.str()
    assert re.search(r"main: over the token budget: pack-[0-9a-f]{8} \(\d+ tokens\)", out)
    cases, _, _, _, _ = builtin_plan()
    n = len(cases)  # each bundled image and video, and each video's codec-style case
    moving = sum(case.kind != "image" for case in cases)  # video and codec cases: 2 explicit-positions rows each
    gridded = sum(case.kind in ("image", "video") for case in cases)  # grid/<case> rows of the grid_thw-only call
    assert f"outputs auto: last_hidden_state and pooler_output compared on {n} cases" in out
    # cases, packed, explicit positions, token order, whole outputs (last_hidden_state and pooler_output of each
    # case), each case's batched row (test_batch: every case on the CPU), the grid_thw-only call's rows
    # (counted from the summary: the table truncates long names, so two rows may share a shortened key there)
    rows = n + n + 2 * moving + 3 + 2 * n + n + gridded
    assert f"{rows} comparisons, {rows} passed, 0 failed" in out and set(verdicts(out).values()) == {"PASS"}


@pytest.mark.parametrize("policy, every", [("off", False), ("all", True), ("auto", True)])
def test_determinism_policy_on_the_cpu(suite, policy, every) -> None:
    cases, _, _, _, _ = builtin_plan()
    reruns = len(cases) if every else 0  # `all` (and `auto` on the CPU) re-runs every bundled case, `off` none
    result = suite.run(f"--determinism={policy}", "-m", "not golden", "--junitxml=det.xml")
    assert result.ret == 0
    out = result.stdout.str()
    assert f"determinism {policy}: {reruns} cases re-run" in out
    assert len(re.findall(r"test_deterministic\[", suite.run(f"--determinism={policy}", "--collect-only", "-q")
                          .stdout.str())) == reruns
    # test_batch follows the same policy: every case in a batch, or none
    batches = hf_batches(junit_forwards(suite.path / "det.xml"))
    assert sorted(c for b in batches for c in b if c in {case.id for case in cases}) == (
        sorted(case.id for case in cases) if every else [])
    hf_forwards = costs(out)["main"][0]
    moving = sum(case.kind != "image" for case in cases)  # video and codec cases: one explicit-positions call each
    # each case, re-runs, explicit positions, the shuffled case (hf sparse and mosaic), one forward per hf batch
    assert hf_forwards == len(cases) + reruns + moving + 2 + len(batches)


@pytest.mark.parametrize("option, message", [
    ("--pack-tokens=0", "--pack-tokens=0: must be >= 1"),
    ("--pack-tokens=1.5", "--pack-tokens=1.5: not a whole number"),
    ("--pack-tokens=lots", "--pack-tokens=lots: not a whole number"),
    ("--shard=0/2", "--shard=0/2: K must be between 1 and N"),
    ("--shard=3/2", "--shard=3/2: K must be between 1 and N"),
    ("--shard=x", "--shard=x: use K/N"),
    ("--determinism=sometimes", "--determinism=sometimes: use one of"),
    ("--companions=sometimes", "--companions=sometimes: use one of ('auto', 'all', 'sample', 'off')"),
    ("--dist=loadfile", "--dist=loadfile: the suite schedules its pack groups itself; pass only -n"),
    ("--dist=worksteal", "--dist=worksteal: the suite schedules its pack groups itself; pass only -n"),
])
def test_bad_work_options_are_usage_errors(suite, option, message) -> None:
    result = suite.run(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


@pytest.mark.parametrize("budget", ["--pack-tokens=1", "--pack-tokens=1000000"])
def test_cross_sample_attention_is_caught_in_groups_of_every_size(suite, tmp_path, monkeypatch, budget) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = build_variant("cross_sample_attention", tmp_path / "checkpoints")
    collected = suite.run(budget, "--collect-only", "-q").stdout.str()
    groups = set(re.findall(r"test_packed\[(pack-[0-9a-f]{8})\]", collected))
    result = suite.run(f"--packing-model={folder}", "--trust-remote-code", budget, "-m", "packed")
    failed = {line.split("[")[1].rstrip("]").split()[0].rstrip("]") for line in result.outlines
              if line.startswith("FAILED") and "test_packed[" in line}
    assert groups and failed == groups


def test_an_empty_selection_in_a_shard_still_fails(suite) -> None:
    """Only a shard that holds no group passes with nothing to run; a -k that matches nothing is still exit 5."""
    result = suite.run(SMALL_BUDGET, "--shard=2/2", "-k", "no_such_case")  # shard 2/2 holds groups
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_an_ini_model_path_is_a_folder_wherever_pytest_starts(suite, monkeypatch) -> None:
    """`vitparity_hf_model = ckpts/hf` (spelled like a hub id) resolves against the ini file's folder."""
    from vitparity.builtin import BUILTIN_HF

    shutil.copytree(BUILTIN_HF, suite.path / "ckpts" / "hf")
    ini = suite.path / "pyproject.toml"
    ini.write_text(ini.read_text().replace("[tool.pytest.ini_options]\n",
                                           "[tool.pytest.ini_options]\nvitparity_hf_model = \"ckpts/hf\"\n"))
    monkeypatch.chdir(suite.path / "parity_tests")
    result = suite.pytester.runpytest_inprocess("-p", "no:cacheprovider", "--device=cpu",
                                                "-k", "coffee_small and not golden")
    assert result.ret == 0, result.stdout.str()[-2000:]
    assert f"hf: {suite.path / 'ckpts' / 'hf'}" in result.stdout.str()


GPU_PLAN = ("--determinism=sample", "--companions=sample")


def junit_forwards(path: Path) -> dict[str, str]:
    """Test name -> the forwards it compared (its `vitparity_forwards` property)."""
    found = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        for prop in case.iter("property"):
            if prop.get("name") == "vitparity_forwards":
                found[case.get("name")] = prop.get("value")
    return found


def hf_batches(forwards: dict[str, str]) -> set[tuple[str, ...]]:
    """The hf batches a run made: the members of each (`hf alone vs hf batch [a + b]` of its test_batch tests)."""
    return {tuple(re.search(r"hf batch \[(.*)\]$", text).group(1).split(" + "))
            for name, text in forwards.items() if name.startswith("test_batch[")}


def builtin_plan():
    """The GPU plan's cases, determinism re-runs, companion probes, shuffled case and pack groups (the CPU's
    budget) on the bundled media."""
    from vitparity.builtin import BUILTIN_MEDIA
    from vitparity.suite.cases import collect_cases, companion_probes, determinism_cases, make_groups
    from vitparity.suite.cases import token_order_cases

    cases = collect_cases([BUILTIN_MEDIA], patch_size=14, align="crop", num_frames=8, codec_frames=8)
    groups = make_groups(cases, 16_384)
    return (cases, determinism_cases("sample", "cpu", groups), companion_probes("sample", "cpu", groups),
            token_order_cases(groups), groups)


def test_gpu_plan_on_the_cpu_takes_packing_features_from_the_packs(suite) -> None:
    """--determinism=sample --companions=sample: one hf and one packing pass per case, the hf re-runs of the sampled
    cases (the largest image and video of each group) and a two-case probe per group; the tests it leaves out are
    named with the reason, and each test records the forwards it compared."""
    result = suite.run(*GPU_PLAN, "--junitxml=plan.xml")
    assert result.ret == 0, result.stdout.str()[-3000:]
    out = result.stdout.str()
    cases, rerun, probes, (shuffled,), groups = builtin_plan()
    tokens = {case.id: case.tokens for case in cases}
    paths = sum(case.tokens for case in cases if case.kind != "image")  # the hf model's explicit-positions calls
    moving = sum(case.kind != "image" for case in cases)
    # sampled: the largest image and the largest video of each group; a two-case probe per group
    sampled = sum(any(c.kind == kind for c in group.cases) for group in groups for kind in ("image", "video"))
    assert len(probes) == len(groups) and not any(probe.whole for probe in probes.values()) and len(rerun) == sampled
    forwards = junit_forwards(suite.path / "plan.xml")
    # test_batch: the run's smallest image and smallest video, each batched (with its mirror image: same tokens)
    batches = hf_batches(forwards)
    batched = sorted(c for b in batches for c in b if c in tokens)
    assert batched == sorted(min((c for c in cases if c.kind == kind), key=lambda c: (c.tokens, c.id)).id
                             for kind in ("image", "video"))
    # a batch of cases costs their tokens; a case alone of its shape is batched with its mirror (as many tokens)
    batch_tokens = sum(sum(tokens[c] for c in b) if all(c in tokens for c in b)
                       else len(b) * next(tokens[c] for c in b if c in tokens) for b in batches)
    # the grid_thw-only call of each group: two packing forwards of its images and videos (not its codec cases)
    grid = sum(case.tokens for case in cases if case.kind in ("image", "video"))
    grid_paths = grid + sum(case.tokens for case in cases if case.kind == "video")
    hf_tokens = sum(tokens.values()) + sum(tokens[c] for c in rerun) + paths + 2 * tokens[shuffled] + batch_tokens
    packing_tokens = (sum(tokens.values()) + 2 * sum(tokens[c] for probe in probes.values() for c in probe.cases)
                      + tokens[shuffled] + 2 * grid)
    assert costs(out)["main"] == (len(cases) + len(rerun) + moving + 2 + len(batches), hf_tokens,
                                  len(groups) + 2 * len(probes) + 1 + 2 * len(groups), packing_tokens, 1, 1)
    ratio = (hf_tokens + packing_tokens) / (2 * sum(tokens.values()) + paths + sum(tokens[c] for c in batched)
                                            + grid_paths)
    assert f"forward tokens: {ratio:.2f}x the one-pass minimum (each case and input path once)" in out
    assert ratio <= 1.35  # groups of the CPU's budget hold few cases: a sample per group is a large share of them
    assert "no swap planned for this group" not in out  # every group has its probe
    assert re.search(r"not run by the plan \(--companions=sample: packing features come from the pack.*"
                     r"test_packing_independent_of_neighbours\[pack-[0-9a-f]{8}\], "
                     r"test_packing_independent_of_neighbours\[pack-[0-9a-f]{8}\]$", out, re.M)
    for probe in probes.values():
        swap = forwards[f"test_companions_do_not_leak[{probe.group}]"]
        assert swap.startswith(f"packing in {probe.group}[{'+'.join(probe.cases)}]")
        assert "a first pass of its own" in swap
    for case in cases:  # each group leans on its own swap
        text = forwards[f"test_parity[{case.id}]"]
        group = re.match(r"hf alone vs packing in (pack-[0-9a-f]{8}) ", text).group(1)
        assert text == (f"hf alone vs packing in {group} (no leak in companion swap "
                        f"{group}[{'+'.join(probes[group].cases)}]: bit-identical)")
    for case in rerun:
        text = forwards[f"test_deterministic[{case}]"]
        assert text.startswith("media decoded twice; hf alone x2; packing: features in pack-")
        assert text.endswith("repeatability shown by that swap")


def test_companions_off_runs_no_swap_and_says_so(suite) -> None:
    result = suite.run("--companions=off", "-m", "not golden", "--junitxml=off.xml")
    assert result.ret == 0
    out = result.stdout.str()
    assert "companions off: 0 groups with a swap" in out and "companion swaps 0;" in out
    assert re.search(r"not run by the plan \(--companions=off: no swap planned for this group\): "
                     r"test_companions_do_not_leak\[pack-[0-9a-f]{8}\], test_companions_do_not_leak\[pack-", out)
    forwards = junit_forwards(suite.path / "off.xml")
    assert not any(name.startswith("test_companions") for name in forwards)
    assert {forwards[name] for name in forwards if name.startswith("test_parity[")} == {"hf alone vs packing alone"}


def test_without_its_probe_selected_the_gpu_plan_runs_the_packing_model_alone(suite) -> None:
    """A -k that leaves out the probe's swap leaves nothing to show that the pack can stand in for a forward alone."""
    result = suite.run(*GPU_PLAN, "-k", "test_parity", "--junitxml=parity.xml")
    assert result.ret == 0
    n = len(builtin_plan()[0])  # each bundled case: one hf forward and one packing forward alone
    assert costs(result.stdout.str())["main"][:4:2] == (n, n)
    assert set(junit_forwards(suite.path / "parity.xml").values()) == {"hf alone vs packing alone"}


def test_gpu_plan_fails_the_probe_on_a_leak_and_stops_leaning_on_the_pack(suite, tmp_path, monkeypatch) -> None:
    """The 1e-6 neighbour leak fails each group's probe swap loudly; the cases of a failing probe's group are
    compared alone."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = build_variant("neighbour_leak_1e-6", tmp_path / "checkpoints")
    result = suite.run(f"--packing-model={folder}", "--trust-remote-code", *GPU_PLAN, "-m", "not golden",
                       "--junitxml=leak.xml")
    assert result.ret == 1
    failed = [line for line in result.outlines if line.startswith("FAILED")]
    _, _, probes, _, groups = builtin_plan()
    assert len(failed) == len(probes) == len(groups)  # one probe per pack group
    assert all(any(f"test_companions_do_not_leak[{group}]" in line for line in failed) for group in probes)
    assert "FAIL: features changed by up to" in result.stdout.str()
    forwards = junit_forwards(suite.path / "leak.xml")
    assert {forwards[name] for name in forwards if name.startswith("test_parity[")} == {"hf alone vs packing alone"}
