"""Cases, pack groups, shards and the per-worker plan: the suite's units of work, decided before any forward.

Everything here is a pure function of the media files and the settings, so every xdist worker, the controller
and every shard's runner computes the same groups, the same shard and the same plan.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from ..media import discover_media, media_kind, scale_suffix, scaled_size
from ..media_probe import image_size, video_size
from ..snapshots import golden_file_stem

# A group closes after a case whose hash marks a boundary (one in BOUNDARY_EVERY), so that adding or removing
# a media file re-cuts only the groups up to the next boundary instead of every group after it.
BOUNDARY_EVERY = 4


class CaseError(ValueError):
    """Media that cannot become distinct cases (two files sharing an id or golden file)."""


def stable_key(text: str) -> int:
    """A hash of `text` that is the same on every machine and Python process."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class ParityCase:
    """One media file at one resolution scale; its id (`image-astronaut.jpg`, `image-astronaut.jpg@0.5` at half
    the native size) is stable on every machine.

    `tokens` is the patch count estimated from the file's stated size (0 when it cannot be read: the case
    then fails when it is decoded), used to plan groups and workers.
    """

    id: str
    kind: str
    path: Path
    tokens: int = 0
    scale: float = 1.0


@dataclass(frozen=True)
class PackGroup:
    """Cases packed into one forward of the packing model; all tests of its cases run together, on one worker."""

    id: str
    cases: tuple[ParityCase, ...]
    budget: int

    @property
    def tokens(self) -> int:
        return sum(case.tokens for case in self.cases)

    @property
    def over_budget(self) -> bool:
        """A case larger than the budget, packed with one neighbour anyway (leakage needs two samples)."""
        return self.tokens > self.budget


def estimate_tokens(kind: str, size: tuple[int, int] | None, *, patch_size: int, align: str, num_frames: int,
                    scale: float = 1.0) -> int:
    """Tokens of a case of native `size` (width, height) at `scale`: whole patches per frame times the frames
    sampled (the size is scaled as vitparity.media scales it, before the patch alignment)."""
    if size is None:
        return 0
    width, height = scaled_size(*size, scale)
    whole = math.floor if align == "crop" else math.ceil
    per_frame = whole(width / patch_size) * whole(height / patch_size)
    return per_frame * (num_frames if kind == "video" else 1)


def collect_cases(media_dirs: list[Path], *, patch_size: int, align: str, num_frames: int,
                  scales: tuple[float, ...] = (1.0,)) -> tuple[ParityCase, ...]:
    """Every image and video of the given folders at every scale, with unique readable ids and token estimates.

    Raises MediaError for a folder that cannot be listed and CaseError for files that would share an id.
    """
    cases: dict[str, ParityCase] = {}
    for folder in media_dirs:
        for path in discover_media(folder):
            kind = media_kind(path)
            size = image_size(path) if kind == "image" else video_size(path)
            for scale in scales:
                tokens = estimate_tokens(kind, size, patch_size=patch_size, align=align, num_frames=num_frames,
                                         scale=scale)
                case = ParityCase(f"{kind}-{path.name}{scale_suffix(scale)}", kind, path, tokens, scale)
                stem = golden_file_stem(case.id)
                if stem in cases:
                    raise CaseError(
                        f"two media files would share the case id or golden file {stem}: {cases[stem].path} and "
                        f"{path} (rename one)"
                    )
                cases[stem] = case
    return tuple(cases.values())


def _group(cases: list[ParityCase], budget: int) -> PackGroup:
    ids = ",".join(sorted(case.id for case in cases))
    return PackGroup(f"pack-{hashlib.sha256(ids.encode('utf-8')).hexdigest()[:8]}", tuple(cases), budget)


def _split_under_budget(chunk: list[ParityCase], budget: int) -> list[list[ParityCase]]:
    """Consecutive pieces of `chunk`, each of two or more cases, closed before the budget would be passed."""
    pieces: list[list[ParityCase]] = []
    current: list[ParityCase] = []
    for case in chunk:
        if len(current) >= 2 and sum(c.tokens for c in current) + case.tokens > budget:
            pieces.append(current)
            current = []
        current.append(case)
    if len(current) == 1 and pieces:  # a case too large for the budget: packed with its neighbour alone
        previous = pieces[-1]
        if len(previous) > 2:
            current.insert(0, previous.pop())
            pieces.append(current)
        else:
            previous.extend(current)
    elif current:
        pieces.append(current)
    return pieces


def make_groups(cases: tuple[ParityCase, ...], budget: int) -> tuple[PackGroup, ...]:
    """Split cases into pack groups of at least two cases under `budget` tokens.

    Cases go in the order of a hash of their id (which mixes images and videos) and are cut into chunks after
    each case whose hash marks a boundary; a chunk of one case joins the next. Each chunk is then split under the
    budget. A group depends only on the cases between two boundaries, so adding or removing a media file re-cuts
    only the groups next to it. A case larger than the budget is packed with a neighbour anyway.
    """
    ordered = sorted(cases, key=lambda case: (stable_key(case.id), case.id))
    chunks: list[list[ParityCase]] = []
    current: list[ParityCase] = []
    for case in ordered:
        current.append(case)
        if stable_key(case.id) % BOUNDARY_EVERY == 0:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    merged: list[list[ParityCase]] = []
    for chunk in chunks:
        if merged and len(merged[-1]) == 1:
            merged[-1].extend(chunk)
        else:
            merged.append(chunk)
    if len(merged) > 1 and len(merged[-1]) == 1:
        merged[-2].extend(merged.pop())
    chunks = merged
    return tuple(_group(piece, budget) for chunk in chunks for piece in _split_under_budget(chunk, budget))


@dataclass(frozen=True)
class Shard:
    """`--shard=K/N`: this runner's share (K counts from 1)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, key: str) -> bool:
        """Whether the unit of work named `key` (a group id, or a test id outside any group) is this shard's."""
        return stable_key(key) % self.count == self.index - 1


def parse_shard(text: str) -> Shard:
    """`K/N` with 1 <= K <= N; ValueError otherwise."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError("use K/N, e.g. 1/4")
    shard = Shard(int(index), int(count))
    if not 1 <= shard.index <= shard.count:
        raise ValueError("K must be between 1 and N")
    return shard


def plan_workers(groups: tuple[PackGroup, ...], workers: int) -> dict[str, int]:
    """Group id -> worker index: largest groups first, each to the least loaded worker (by tokens).

    Deterministic, so the controller and every worker agree on it.
    """
    load = [0] * max(workers, 1)
    owner = {}
    for group in sorted(groups, key=lambda g: (-g.tokens, g.id)):
        index = min(range(len(load)), key=lambda i: (load[i], i))
        owner[group.id] = index
        load[index] += group.tokens
    return owner


def determinism_cases(policy: str, device: str, groups: tuple[PackGroup, ...], owner: dict[str, int]) -> set[str]:
    """Case ids whose forwards are run a second time to check determinism.

    `all`: every case; `off`: none; `auto`: every case on the CPU, and on a GPU the largest image and the largest
    video of each worker's share (long sequences are the likeliest to meet non-deterministic kernels).
    """
    cases = [case for group in groups for case in group.cases]
    if policy == "off":
        return set()
    if policy == "all" or not device.startswith("cuda"):
        return {case.id for case in cases}
    chosen = set()
    for worker in sorted(set(owner.values())):
        share = [case for group in groups if owner[group.id] == worker for case in group.cases]
        for kind in ("image", "video"):
            of_kind = [case for case in share if case.kind == kind]
            if of_kind:
                chosen.add(max(of_kind, key=lambda case: (case.tokens, case.id)).id)
    return chosen

