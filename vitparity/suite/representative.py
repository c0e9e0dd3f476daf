"""Whether the media are representative of the card: a release gated on small files never runs the sequence
lengths, nor the pack sizes, that its users' inputs reach.

Two figures of the plan (estimated tokens, decided before any forward): the largest case and the largest pack
group against its token budget (`--pack-tokens`). The media are not representative when no case reaches
REPRESENTATIVE_CASE_TOKENS, or no pack reaches NEAR_BUDGET of its budget. On CUDA the summary warns;
`--require-representative` makes it a usage error before any test, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from .cases import PackGroup

# docs/benchmarks.md measures GPU forwards from 10k tokens up (a ViT-L forward below that is launch bound), so a
# release gate's media should hold at least one case of that length.
REPRESENTATIVE_CASE_TOKENS = 10_000
NEAR_BUDGET = 0.5  # the largest pack should fill at least half of its budget


@dataclass(frozen=True)
class MediaScale:
    """The largest case and the largest pack group of the run's plan (all shards), by estimated tokens."""

    case: str
    case_tokens: int
    pack: str
    pack_tokens: int
    budget: int

    @property
    def fill(self) -> float:
        """The largest pack's tokens / its budget (may exceed 1: a case larger than the budget is packed anyway)."""
        return self.pack_tokens / self.budget if self.budget else 0.0

    def line(self) -> str:
        return (f"largest pack: {self.pack} {self.pack_tokens:,} of {self.budget:,} tokens ({self.fill:.1%} of its "
                f"budget); largest case: {self.case} {self.case_tokens:,} tokens (estimated)")

    def problems(self) -> list[str]:
        """Why the media are not representative ([] when they are)."""
        problems = []
        if self.case_tokens < REPRESENTATIVE_CASE_TOKENS:
            problems.append(f"no case reaches {REPRESENTATIVE_CASE_TOKENS:,} tokens (largest: {self.case}, "
                            f"{self.case_tokens:,})")
        if self.fill < NEAR_BUDGET:
            problems.append(f"no pack reaches {NEAR_BUDGET:.0%} of its {self.budget:,}-token budget (largest: "
                            f"{self.pack}, {self.pack_tokens:,})")
        return problems


def media_scale(groups: tuple[PackGroup, ...], budget: int) -> MediaScale:
    """The figures of `groups` (every group of the run); ValueError when there is none."""
    if not groups:
        raise ValueError("no pack group")
    pack = max(groups, key=lambda group: (group.tokens, group.id))
    case = max((case for group in groups for case in group.cases), key=lambda case: (case.tokens, case.id))
    return MediaScale(case.id, case.tokens, pack.id, pack.tokens, budget)


def check_representative(groups: tuple[PackGroup, ...], budget: int, required: bool, label: str) -> MediaScale | None:
    """The figures of the run's groups (None without any); with `required` (--require-representative, spelled
    `label`), media that are not representative are a pytest.UsageError naming why."""
    if not groups:
        return None
    scale = media_scale(groups, budget)
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
