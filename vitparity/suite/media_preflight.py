"""The run's media decoded before any model loads (`vitparity.media_check`): in the controller, or the only process
without xdist, before workers start, so that broken files are one usage error, printed once, and no test runs."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from ..codec import context_frames
from ..media_check import MediaCheckError, MediaUse, check_media
from ..pair import PairFiles
from .cases import ParityCase
from .schedule import Plan
from .settings import Settings


def media_uses(cases: Iterable[ParityCase], *, num_frames: int, codec_frames: int) -> list[MediaUse]:
    """How the cases decode their files, each way once, in the cases' order: an image case its image; a video case
    `num_frames` sampled frames (at native size: a scale only resizes the decoded frames); a codec-style case
    `codec_frames` (the temporal context); a codec asset folder its files."""
    uses: dict[MediaUse, None] = {}
    for case in cases:
        if case.kind == "image":
            uses[MediaUse(case.path, "image")] = None
        elif case.kind == "video":
            uses[MediaUse(case.path, "video", num_frames)] = None
        elif case.kind == "codec":
            uses[MediaUse(case.path, "video", codec_frames)] = None
        else:
            uses[MediaUse(case.path, "assets")] = None
    return list(uses)


def check_run_media(plan: Plan, settings: Settings, files: PairFiles) -> None:
    """Decode every file of this run's (this shard's) cases as its cases will; pytest.UsageError listing every file
    that cannot be used, with its reason and what the decoder wrote, before any model loads."""
    mine = {case.id for group in plan.groups for case in group.cases}
    cases = [case for case in plan.cases if case.id in mine]  # the order the files were given in
    uses = media_uses(cases, num_frames=settings.num_frames, codec_frames=context_frames(files.temporal_context))
    try:
        check_media(uses, patch_size=files.patch_size, align=settings.align)
    except MediaCheckError as err:
        raise pytest.UsageError(str(err)) from None
