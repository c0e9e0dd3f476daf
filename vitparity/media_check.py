"""Every media file of a run decoded before any model loads: one error that lists each file that cannot be used.

The suite (`vitparity.suite.media_preflight`, in the controller before xdist starts its workers) and `vitparity
extract` decode each file the way the run will use it, with the same functions the run uses (`vitparity.media`,
`vitparity.codec_assets.load_assets`): an image whole (integrity first), a video's sampled frames at each frame
count the run samples (the container opened, the sampled frames decoded, the frame count checked up to its end), a
codec asset folder complete with its mosaics. A file that fails is not a test failure among passing ones: the run
stops with one `MediaCheckError` naming every such file and its reason, before any model is loaded.

What OpenCV and FFmpeg write to the process's stderr while a file is decoded (file descriptor 2, from native code:
`moov atom not found`, `[ WARN:0] ... can't be used to capture by name`) is captured (`captured_stderr`): the lines
of a file that fails are part of its reason, those of a file that decodes are dropped.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .codec_assets import load_assets
from .media import Media, MediaError, StrPath, load_image, load_video

KINDS = ("image", "video", "assets")
# Distinct decoder lines kept in one file's reason: a corrupt stream repeats its complaint once per frame.
DECODER_LINES = 5
# Per-run noise in native log lines: FFmpeg's context address ("[mov,mp4 @ 0x55d0...]") and OpenCV's thread and
# time stamp ("[ WARN:0@0.141]"); without them, the same complaint on every frame is one line.
_NOISE = (re.compile(r" @ 0x[0-9a-fA-F]+\]"), "]"), (re.compile(r"^\[ ?(\w+):\d+@[\d.]+\]"), r"[\1]")


@dataclass(frozen=True)
class MediaUse:
    """One way a run decodes a file: `kind` "image" (decoded whole), "video" (`num_frames` frames sampled uniformly,
    the release formula) or "assets" (a codec asset folder)."""

    path: StrPath
    kind: str
    num_frames: int = 0


class MediaCheckError(ValueError):
    """Media of a run that cannot be used; str() lists every file with its reason, one file per line."""

    def __init__(self, problems: list[MediaError]) -> None:
        self.problems = problems
        count = f"{len(problems)} media file{'s' if len(problems) > 1 else ''}"
        lines = "".join(f"\n  {problem}" for problem in problems)
        super().__init__(f"{count} cannot be used (every file is decoded before any model loads):{lines}")


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Send file descriptor 2 (where OpenCV's and FFmpeg's native code log) to a temporary file for the block; the
    non-empty lines written there are appended to the yielded list when the block ends (also on an exception)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                sink.seek(0)
                text = sink.read().decode("utf-8", errors="replace")
                lines.extend(line.strip() for line in text.splitlines() if line.strip())
    finally:
        os.close(saved)


def decode(use: MediaUse, *, patch_size: int, align: str) -> Media:
    """Decode one use of a file at native size, patch-aligned (`align`: crop, resize, pad) to `patch_size` pixels:
    an image (H, W, 3), a video's `num_frames` sampled frames (T, H, W, 3) or an asset folder's mosaics, as uint8 RGB.
    MediaError naming the file and the reason when it cannot be used."""
    if use.kind == "image":
        return load_image(use.path, patch_size=patch_size, align=align)
    if use.kind == "video":
        return load_video(use.path, num_frames=use.num_frames, patch_size=patch_size, align=align)
    if use.kind == "assets":
        return load_assets(use.path, patch_size=patch_size)
    raise ValueError(f"unknown media use {use.kind!r}; expected one of {', '.join(KINDS)}")


def check_media(uses: Iterable[MediaUse], *, patch_size: int, align: str, keep: bool = False
                ) -> dict[MediaUse, Media]:
    """Decode every use (`decode`), with native stderr captured; the decoded media when `keep` (else {}: a run that
    decodes them again elsewhere holds no frames here).

    MediaCheckError listing, in the order given, every file that cannot be used with its reason and the distinct
    lines the decoder wrote for it (at most DECODER_LINES); a file is named once, at its first use that fails.
    """
    problems: dict[StrPath, MediaError] = {}
    decoded: dict[MediaUse, Media] = {}
    for use in uses:
        if use.path in problems:
            continue
        failure: MediaError | None = None
        with captured_stderr() as lines:
            try:
                media = decode(use, patch_size=patch_size, align=align)
            except MediaError as err:
                failure = err
        if failure is not None:
            problems[use.path] = _with_decoder_lines(failure, lines)
        elif keep:
            decoded[use] = media
    if problems:
        raise MediaCheckError(list(problems.values()))
    return decoded


def _with_decoder_lines(error: MediaError, lines: list[str]) -> MediaError:
    """`error` with the distinct decoder lines (run-specific noise removed, at most DECODER_LINES) added to its
    reason, or as it is when the decoder wrote nothing."""
    distinct: list[str] = []
    for line in lines:
        for pattern, replacement in _NOISE:
            line = pattern.sub(replacement, line)
        if line not in distinct:
            distinct.append(line)
    if not distinct:
        return error
    shown = distinct[:DECODER_LINES]
    more = f" (and {len(distinct) - DECODER_LINES} more)" if len(distinct) > DECODER_LINES else ""
    return MediaError(error.path, f"{error.reason}; the decoder wrote: {' | '.join(shown)}{more}")
