"""The suite's plan: cases probed without decoding, pack groups, shards, the worker split, the sampled checks."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from vitparity.builtin import BUILTIN_MEDIA
from vitparity.media_probe import image_size, video_size
from vitparity.suite.cases import (
    PackGroup, ParityCase, collect_cases, companion_probes, determinism_cases, estimate_tokens, float32_probe_case,
    make_groups, parse_shard, plan_workers, token_order_cases,
)


def synthetic_cases(count: int, seed: int = 0, prefix: str = "") -> tuple[ParityCase, ...]:
    """Images of 100-1500 tokens and 8-frame videos of 1k-85k tokens, as a release gate's media would be."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kind = rng.choice(["image", "video"])
        tokens = rng.randint(100, 1500) if kind == "image" else 8 * rng.randint(128, 10_549)
        name = f"{prefix}{i:04d}.{'jpg' if kind == 'image' else 'mp4'}"
        cases.append(ParityCase(f"{kind}-{name}", kind, Path(name), tokens))
    return tuple(cases)


@pytest.mark.parametrize("budget", [1, 2_000, 16_384, 131_072, 10**9])
def test_groups_cover_every_case_once_with_two_or_more_cases_under_the_budget(budget) -> None:
    cases = synthetic_cases(200)
    groups = make_groups(cases, budget)
    members = [case.id for group in groups for case in group.cases]
    assert sorted(members) == sorted(case.id for case in cases)
    assert all(len(group.cases) >= 2 for group in groups)
    for group in groups:
        if group.over_budget:  # only a case too large to share a pack within the budget, with one neighbour
            assert any(sum(c.tokens for c in group.cases if c is not case) + case.tokens > budget
                       for case in group.cases)
            assert len(group.cases) <= 3  # the pair, plus a single case left at the end
        else:
            assert group.tokens <= budget
    assert len({group.id for group in groups}) == len(groups)


def test_groups_do_not_depend_on_the_order_media_are_found() -> None:
    cases = list(synthetic_cases(60))
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    assert make_groups(tuple(cases), 50_000) == make_groups(tuple(shuffled), 50_000)


def test_groups_mix_images_and_videos() -> None:
    groups = make_groups(synthetic_cases(200), 10**9)
    mixed = [g for g in groups if {c.kind for c in g.cases} == {"image", "video"}]
    assert len(mixed) >= len(groups) / 2


@pytest.mark.parametrize("budget", [50_000, 131_072, 10**9])
def test_adding_one_media_file_moves_few_cases(budget) -> None:
    """Groups are cut at hash boundaries, so one new file re-cuts only the groups next to it."""
    cases = synthetic_cases(300)
    before = {c.id: g.id for g in make_groups(cases, budget) for c in g.cases}
    moved = []
    for extra in synthetic_cases(20, seed=7, prefix="new-"):
        after = {c.id: g.id for g in make_groups(cases + (extra,), budget) for c in g.cases}
        moved.append(sum(after[case_id] != group for case_id, group in before.items()))
    assert max(moved) <= 30 and np.mean(moved) <= 12, moved  # of 300 cases: at most the cases between two boundaries


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_shards_are_disjoint_cover_every_group_and_each_gets_work(count) -> None:
    groups = make_groups(synthetic_cases(120), 40_000)
    shards = [parse_shard(f"{k}/{count}").groups(groups) for k in range(1, count + 1)]
    assert sorted(g.id for shard in shards for g in shard) == sorted(g.id for g in groups)
    assert all(shards)
    assert [parse_shard(f"{k}/{count}").groups(groups) for k in range(1, count + 1)] == shards  # deterministic


@pytest.mark.parametrize("count", [2, 3, 4])
def test_shards_are_balanced_by_tokens(count) -> None:
    """The longest-first rule: with 4+ groups per shard the busiest carries at most 1.15x the mean here, with 2+
    at most 1.3x (the release-gate mix of synthetic_cases; docs/benchmarks.md measures real media)."""
    for cases, per_shard, bound in ((400, 4, 1.15), (60, 2, 1.3)):
        groups = make_groups(synthetic_cases(cases, seed=3), 131_072)
        assert len(groups) >= per_shard * count
        load = [sum(g.tokens for g in parse_shard(f"{k}/{count}").groups(groups)) for k in range(1, count + 1)]
        assert max(load) <= bound * sum(load) / count, (per_shard, load)


def test_every_shard_gets_work_even_with_groups_of_unknown_size() -> None:
    cases = [ParityCase(f"video-{i}.mp4", "video", Path(f"{i}.mp4"), 0) for i in range(8)]
    groups = tuple(PackGroup(f"pack-{i}", tuple(cases[2 * i:2 * i + 2]), 1) for i in range(4))
    assert all(parse_shard(f"{k}/4").groups(groups) for k in range(1, 5))


@pytest.mark.parametrize("text", ["0/2", "3/2", "x", "1/0", "1/", "/2", "-1/2", "1.5/2"])
def test_malformed_shards_are_refused(text) -> None:
    with pytest.raises(ValueError):
        parse_shard(text)


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_worker_split_is_balanced_by_tokens(workers) -> None:
    groups = make_groups(synthetic_cases(400), 131_072)
    assert len(groups) >= 4 * workers
    owner = plan_workers(groups, workers)
    load = [sum(g.tokens for g in groups if owner[g.id] == w) for w in range(workers)]
    assert max(load) <= 1.3 * (sum(load) / workers), load
    assert plan_workers(groups, workers) == owner


def test_determinism_policy() -> None:
    cases = synthetic_cases(40)
    groups = make_groups(cases, 50_000)
    everything = {case.id for case in cases}
    assert determinism_cases("all", "cuda", groups) == everything
    assert determinism_cases("auto", "cpu", groups) == everything
    assert determinism_cases("off", "cpu", groups) == set()
    chosen = determinism_cases("auto", "cuda", groups)
    expected = set()
    for group in groups:  # the largest image and the largest video of each pack group
        for kind in ("image", "video"):
            of_kind = [c for c in group.cases if c.kind == kind]
            if of_kind:
                expected.add(max(of_kind, key=lambda c: c.tokens).id)
    assert chosen == expected and len(chosen) > len(groups)
    assert determinism_cases("sample", "cpu", groups) == chosen  # the GPU's choice, on any device
    for count in (2, 3):  # a rule per group: each shard samples its own groups as the whole run does
        shards = [parse_shard(f"{k}/{count}").groups(groups) for k in range(1, count + 1)]
        assert set().union(*(determinism_cases("sample", "cpu", shard) for shard in shards)) == chosen


def test_companion_policy() -> None:
    groups = make_groups(synthetic_cases(40), 50_000)
    every = companion_probes("all", "cpu", groups)
    assert set(every) == {g.id for g in groups} and every == companion_probes("auto", "cpu", groups)
    for group in groups:  # the whole pack, each half of it kept once: every case queried
        probe = every[group.id]
        assert probe.whole and probe.cases == tuple(c.id for c in group.cases)
        assert sorted(i for kept in probe.kept for i in kept) == list(range(len(group.cases)))
    assert companion_probes("off", "cuda", groups) == {}
    sample = companion_probes("sample", "cpu", groups)
    assert sample == companion_probes("auto", "cuda", groups)
    assert set(sample) == {g.id for g in groups}  # one probe per pack group, whatever the workers and shards
    tokens = {c.id: c.tokens for g in groups for c in g.cases}
    for group_id, probe in sample.items():
        assert len(probe.cases) == 2 and len(probe.kept) == 1
        group = next(g for g in groups if g.id == group_id)
        assert sorted(tokens[c] for c in probe.cases) == sorted(c.tokens for c in group.cases)[:2]  # the smallest
        assert probe.whole == (len(group.cases) == 2)  # a group of two is its own probe: its pack is reused
        kept = probe.cases[probe.kept[0][0]]
        assert tokens[kept] == max(tokens[c] for c in probe.cases)  # the larger case is queried


def test_one_case_of_the_run_is_shuffled_and_carries_the_float32_probe() -> None:
    cases = synthetic_cases(40)
    codec = tuple(ParityCase(f"codec-{c.id[6:]}", "codec", c.path, c.tokens) for c in cases if c.kind == "video")
    groups = make_groups(cases + codec, 50_000)
    assert token_order_cases(groups) == {min(codec, key=lambda c: (c.tokens, c.id)).id}
    assert token_order_cases(make_groups(cases, 50_000)) == set()  # no codec-style case: nothing to shuffle
    unknown = ParityCase("image-unreadable.jpg", "image", Path("unreadable.jpg"))  # 0 tokens: size not known
    assert float32_probe_case([*cases, unknown]) == min(cases, key=lambda c: (c.tokens, c.id)).id
    assert float32_probe_case([unknown]) == unknown.id and float32_probe_case([]) is None


def test_probed_sizes_equal_the_decoded_sizes_of_the_bundled_media() -> None:
    for path in sorted(BUILTIN_MEDIA.iterdir()):
        if path.suffix in (".jpg", ".png"):
            decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert image_size(path) == (decoded.shape[1], decoded.shape[0]), path.name
        elif path.suffix == ".mp4":
            capture = cv2.VideoCapture(str(path))
            ok, frame = capture.read()
            capture.release()
            assert ok and video_size(path) == (frame.shape[1], frame.shape[0]), path.name


def test_unreadable_media_probe_as_unknown(tmp_path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
    (tmp_path / "bad.mp4").write_bytes(bytes(range(256)))
    assert image_size(tmp_path / "bad.jpg") is None
    assert image_size(tmp_path / "bad.png") is None
    assert video_size(tmp_path / "bad.mp4") is None
    assert image_size(tmp_path / "missing.jpg") is None
    cases = collect_cases([tmp_path], patch_size=14, align="crop", num_frames=8)
    assert {case.id: case.tokens for case in cases} == {"image-bad.jpg": 0, "image-bad.png": 0, "video-bad.mp4": 0}


def test_token_estimates_follow_the_alignment() -> None:
    assert estimate_tokens("image", (1918, 1078), patch_size=14, align="crop", num_frames=8) == 137 * 77
    assert estimate_tokens("image", (1918, 1078), patch_size=14, align="pad", num_frames=8) == 137 * 77
    assert estimate_tokens("image", (1919, 1079), patch_size=14, align="resize", num_frames=8) == 138 * 78
    assert estimate_tokens("video", (1918, 1078), patch_size=14, align="crop", num_frames=8) == 8 * 137 * 77
    assert estimate_tokens("video", None, patch_size=14, align="crop", num_frames=8) == 0


def test_node_ids_with_escaped_case_ids_map_to_their_group(tmp_path) -> None:
    """pytest writes non-ASCII characters of ids as escapes: the xdist controller still finds the case's group."""
    from vitparity.suite.schedule import Plan

    cases = (ParityCase("image-café.jpg", "image", Path("café.jpg"), 100),
             ParityCase("video-b.mp4", "video", Path("b.mp4"), 800))
    groups = make_groups(cases, 10_000)
    plan = Plan(cases, groups, groups, plan_workers(groups, 2), frozenset())
    (group,) = groups
    assert plan.scope_of("parity_tests/test_parity.py::test_parity[image-caf\\xe9.jpg]") == group.id
    assert plan.scope_of("parity_tests/test_golden.py::test_golden[image-caf\\xe9.jpg-hf]") == group.id
    assert plan.scope_of(f"parity_tests/test_checks.py::test_packed[{group.id}]") == group.id
