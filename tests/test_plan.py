"""The suite's plan: cases probed without decoding, pack groups, shards, the worker split, the determinism policy."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from vitparity.builtin import BUILTIN_MEDIA
from vitparity.media_probe import image_size, video_size
from vitparity.suite.cases import (
    ParityCase, collect_cases, determinism_cases, estimate_tokens, make_groups, parse_shard, plan_workers,
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


@pytest.mark.parametrize("count", [2, 3, 5])
def test_shards_are_disjoint_and_cover_every_group(count) -> None:
    groups = make_groups(synthetic_cases(120), 40_000)
    shards = [parse_shard(f"{k}/{count}") for k in range(1, count + 1)]
    owners = [[shard for shard in shards if shard.holds(group.id)] for group in groups]
    assert all(len(owner) == 1 for owner in owners)
    assert all(any(shard.holds(group.id) for group in groups) for shard in shards)


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
    owner = plan_workers(groups, 2)
    everything = {case.id for case in cases}
    assert determinism_cases("all", "cuda", groups, owner) == everything
    assert determinism_cases("auto", "cpu", groups, owner) == everything
    assert determinism_cases("off", "cpu", groups, owner) == set()
    chosen = determinism_cases("auto", "cuda", groups, owner)
    expected = set()
    for worker in (0, 1):
        share = [c for g in groups if owner[g.id] == worker for c in g.cases]
        for kind in ("image", "video"):
            expected.add(max((c for c in share if c.kind == kind), key=lambda c: c.tokens).id)
    assert chosen == expected and len(chosen) == 4


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
