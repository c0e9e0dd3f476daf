"""Whether the media are representative of the card: a release gated on small files never runs the sequence
lengths, nor the pack sizes, that its users' inputs reach.

Two figures of the plan (estimated tokens, decided before any forward): the largest case and the largest pack
group against its token budget (`--pack-tokens`). The media are not representative when no case reaches
REPRESENTATIVE_CASE_TOKENS, or no pack reaches NEAR_BUDGET of its budget. Nor when they miss where faults hide:
no case past the pretraining grid (PRETRAINING_GRID patches) on the h axis, or on the w axis; no video at a frame
count other than the run's (--num-frames; a file named `<stem>@<N>f` samples N, `suite.cases.frames_in_name`), nor
other than the release's RELEASE_FRAMES; no pack that mixes images and videos. On CUDA the summary warns;
`--require-representative` makes it a usage error before any test, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from .cases import FRAMES_IN_NAME, PackGroup, ParityCase

# docs/benchmarks.md measures GPU forwards from 10k tokens up (a ViT-L forward below that is launch bound), so a
# release gate's media should hold at least one case of that length.
REPRESENTATIVE_CASE_TOKENS = 10_000
NEAR_BUDGET = 0.5  # the largest pack should fill at least half of its budget
# The release pretrains at 448 px with 14 px patches: RoPE positions past 32 on an axis are where a fault of
# positions (a table or a clamp sized for the pretraining grid) hides from smaller media.
PRETRAINING_GRID = 448 // 14
RELEASE_FRAMES = 8  # the frames the release's tools sample per video
VIDEO_KINDS = ("video", "codec", "assets")  # cases that go through the temporal context


@dataclass(frozen=True)
class MediaScale:
    """The largest case and the largest pack group of the run's plan (all shards), by estimated tokens."""

    case: str
    case_tokens: int
    pack: str
    pack_tokens: int
    budget: int
    past_grid_h: str = ""  # a case with more than PRETRAINING_GRID patch rows ("" for none)
    past_grid_w: str = ""  # a case with more than PRETRAINING_GRID patch columns
    other_frames: str = ""  # a video case sampling other than the run's frame count
    not_release_frames: str = ""  # a video case sampling other than RELEASE_FRAMES
    mixed_pack: str = ""  # a pack group holding an image and a video
    num_frames: int = RELEASE_FRAMES  # the run's frame count per video

    @property
    def fill(self) -> float:
        """The largest pack's tokens / its budget (may exceed 1: a case larger than the budget is packed anyway)."""
        return self.pack_tokens / self.budget if self.budget else 0.0

    def line(self) -> str:
        """The summary's media line: the largest pack and case, then where the media reach (a case of each, or
        none)."""

        def some(case: str) -> str:
            return case or "none"

        return (f"largest pack: {self.pack} {self.pack_tokens:,} of {self.budget:,} tokens ({self.fill:.1%} of its "
                f"budget); largest case: {self.case} {self.case_tokens:,} tokens (estimated); past the "
                f"{PRETRAINING_GRID}-patch pretraining grid: h {some(self.past_grid_h)}, w {some(self.past_grid_w)}; "
                f"video at other than {self.num_frames} frames: {some(self.other_frames)}; at other than the release's "
                f"{RELEASE_FRAMES}: {some(self.not_release_frames)}; pack of images and videos: "
                f"{some(self.mixed_pack)}")

    def problems(self) -> list[str]:
        """Why the media are not representative ([] when they are)."""
        problems = []
        if self.case_tokens < REPRESENTATIVE_CASE_TOKENS:
            problems.append(f"no case reaches {REPRESENTATIVE_CASE_TOKENS:,} tokens (largest: {self.case}, "
                            f"{self.case_tokens:,})")
        if self.fill < NEAR_BUDGET:
            problems.append(f"no pack reaches {NEAR_BUDGET:.0%} of its {self.budget:,}-token budget (largest: "
                            f"{self.pack}, {self.pack_tokens:,})")
        for axis, case in (("h", self.past_grid_h), ("w", self.past_grid_w)):
            if not case:
                problems.append(f"no case goes past the {PRETRAINING_GRID}-patch pretraining grid on the {axis} axis "
                                f"(more than {PRETRAINING_GRID * 14} px at patch 14)")
        if not self.other_frames:
            problems.append(f"no video samples other than the run's {self.num_frames} frames (name one "
                            "<stem>@<N>f.<ext>)")
        if not self.not_release_frames:
            problems.append(f"no video samples other than the release's {RELEASE_FRAMES} frames")
        if not self.mixed_pack:
            problems.append("no pack mixes images and videos")
        return problems


def media_scale(groups: tuple[PackGroup, ...], budget: int, num_frames: int | None = None) -> MediaScale:
    """The figures of `groups` (every group of the run) whose videos sample `num_frames` (--num-frames; None: the
    frame count of the run's videos whose names give none, else RELEASE_FRAMES); ValueError when there is no group."""
    if not groups:
        raise ValueError("no pack group")
    cases = [case for group in groups for case in group.cases]
    videos = [case for case in cases if case.kind == "video"]
    if num_frames is None:
        num_frames = next((case.frames for case in videos if not FRAMES_IN_NAME.search(case.path.stem)),
                          RELEASE_FRAMES)
    pack = max(groups, key=lambda group: (group.tokens, group.id))
    case = max(cases, key=lambda case: (case.tokens, case.id))

    def first(found: list[ParityCase]) -> str:
        return min(found, key=lambda case: (case.tokens, case.id)).id if found else ""

    mixed = [group for group in groups if {c.kind for c in group.cases} & {"image"}
             and {c.kind for c in group.cases} & set(VIDEO_KINDS)]
    return MediaScale(
        case.id, case.tokens, pack.id, pack.tokens, budget,
        past_grid_h=first([c for c in cases if c.patches[0] > PRETRAINING_GRID]),
        past_grid_w=first([c for c in cases if c.patches[1] > PRETRAINING_GRID]),
        other_frames=first([c for c in videos if c.frames != num_frames]),
        not_release_frames=first([c for c in videos if c.frames != RELEASE_FRAMES]),
        mixed_pack=min((group.id for group in mixed), default=""), num_frames=num_frames,
    )


def check_representative(groups: tuple[PackGroup, ...], budget: int, required: bool, label: str,
                         num_frames: int | None = None) -> MediaScale | None:
    """The figures of the run's groups (None without any) for videos of `num_frames` (`media_scale`); with
    `required` (--require-representative, spelled `label`), media that are not representative are a
    pytest.UsageError naming why."""
    if not groups:
        return None
    scale = media_scale(groups, budget, num_frames)
    problems = scale.problems()
    if required and problems:
        raise pytest.UsageError(f"{label}: the media are not representative of the card: {'; '.join(problems)}. "
                                "Add media of your own (--media, --no-bundled-media)")
    return scale


def warnings(scale: MediaScale | None, device: str) -> list[str]:
    """The summary's warnings: on CUDA, why the media are not representative."""
    if scale is None or not device.startswith("cuda"):
        return []
    return [f"media not representative of the card: {problem} (add media of your own with --media; "
            "--require-representative fails instead)" for problem in scale.problems()]
