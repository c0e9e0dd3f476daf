"""Cases, pack groups, shards, the split over workers and the sampled checks: the suite's units of work, decided
before any forward.

Everything here is a pure function of the media files and the settings, so every xdist worker, the controller
and every shard's runner computes the same groups, the same shard and the same plan. The sampled checks are chosen
by the cases alone (a rule per pack group, or one case of the run), never by worker or shard: `-n 1`, `-n 4` and
any `--shard=K/N` run the same checks and the same forwards.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..choices import TEMPORAL_CONTEXT
from ..codec_assets import estimated_tokens, is_asset_folder
from ..independence import alternate_halves
from ..media import discover_media, media_kind, scale_suffix, scaled_size
from ..media_probe import image_size, video_size
from ..snapshots import golden_file_stem

# A group closes after a case whose hash marks a boundary (one in BOUNDARY_EVERY), so that adding or removing
# a media file re-cuts only the groups up to the next boundary instead of every group after it.
BOUNDARY_EVERY = 4
# A video file whose name ends in `@<N>f` before its extension (`coffee_tilt@4f.mp4`) samples N frames instead of
# --num-frames: a run reaches another frame count of the temporal context without an option of its own.
FRAMES_IN_NAME = re.compile(r"@([1-9][0-9]*)f$")


class CaseError(ValueError):
    """Media that cannot become distinct cases (two files sharing an id or golden file)."""


def stable_key(text: str) -> int:
    """A hash of `text` that is the same on every machine and Python process."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class ParityCase:
    """One media file at one resolution scale; its id (`image-astronaut.jpg`, `image-astronaut.jpg@0.5` at half
    the native size) is stable on every machine. Kind "codec" (`codec-astronaut_pan.mp4`): the video's
    codec-style sparse selection at native size (`vitparity.codec`). Kind "assets" (`assets-<folder>`): a codec
    asset folder of the release (`vitparity.codec_assets`).

    `tokens` is the patch count estimated from the file's stated size (0 when it cannot be read: the case
    then fails when it is decoded), used to plan groups and workers. `frames`: the frames a video case samples
    (--num-frames, or the `@<N>f` of its file name: `frames_in_name`; 1 for an image); `patches`: the (h, w)
    patches of one of its frames (0, 0 when unknown), estimated like `tokens`.
    """

    id: str
    kind: str
    path: Path
    tokens: int = 0
    scale: float = 1.0
    frames: int = 1
    patches: tuple[int, int] = (0, 0)


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


def estimate_patches(size: tuple[int, int] | None, *, patch_size: int, align: str, scale: float = 1.0
                     ) -> tuple[int, int]:
    """(h, w) whole patches of one frame of native `size` (width, height) at `scale` (the size is scaled as
    vitparity.media scales it, before the patch alignment); (0, 0) for an unknown size."""
    if size is None:
        return 0, 0
    width, height = scaled_size(*size, scale)
    whole = math.floor if align == "crop" else math.ceil
    return whole(height / patch_size), whole(width / patch_size)


def estimate_tokens(kind: str, size: tuple[int, int] | None, *, patch_size: int, align: str, num_frames: int,
                    scale: float = 1.0) -> int:
    """Tokens of a case of native `size` (width, height) at `scale`: whole patches per frame (`estimate_patches`)
    times the frames sampled."""
    h, w = estimate_patches(size, patch_size=patch_size, align=align, scale=scale)
    return h * w * (1 if kind == "image" else num_frames)


def frames_in_name(path: Path, default: int) -> int:
    """The frames a video file's case samples: N for a name ending in `@<N>f` before the extension
    (`FRAMES_IN_NAME`), else `default` (--num-frames). CaseError for N above the temporal context."""
    match = FRAMES_IN_NAME.search(Path(path).stem)
    if match is None:
        return default
    frames = int(match.group(1))
    if frames > TEMPORAL_CONTEXT:
        raise CaseError(f"{path}: @{frames}f in its name asks for more frames than the temporal context "
                        f"({TEMPORAL_CONTEXT})")
    return frames


def collect_cases(media_dirs: list[Path], *, patch_size: int, align: str, num_frames: int,
                  scales: tuple[float, ...] = (1.0,), codec_frames: int = 0) -> tuple[ParityCase, ...]:
    """Every image and video of the given folders (and each single media file given instead of a folder) at every
    scale, with unique readable ids and token estimates; with `codec_frames` > 0 and scale 1 listed, also each
    video's codec-style case of that budget (frames' worth of tokens, native size); each codec asset folder (a
    subfolder with the release's layout) as one case.

    Raises MediaError for a folder that cannot be listed or a file that is not an image or video, and CaseError for
    files that would share an id.
    """
    cases: dict[str, ParityCase] = {}
    for folder in media_dirs:
        for path in media_files(folder):
            if path.is_dir():
                _add(cases, ParityCase(f"assets-{path.name}", "assets", path, estimated_tokens(path)))
                continue
            kind = media_kind(path)
            size = image_size(path) if kind == "image" else video_size(path)
            frames = 1 if kind == "image" else frames_in_name(path, num_frames)
            variants = [(kind, f"{kind}-{path.name}{scale_suffix(scale)}", scale, frames) for scale in scales]
            if kind == "video" and codec_frames and 1.0 in scales:  # native size only: with scale 1 listed
                variants.append(("codec", f"codec-{path.name}", 1.0, codec_frames))
            for case_kind, case_id, scale, count in variants:
                tokens = estimate_tokens(case_kind, size, patch_size=patch_size, align=align, num_frames=count,
                                         scale=scale)
                patches = estimate_patches(size, patch_size=patch_size, align=align, scale=scale)
                _add(cases, ParityCase(case_id, case_kind, path, tokens, scale, count, patches))
    return tuple(cases.values())


def media_files(path: Path) -> list[Path]:
    """The media of one --media entry: a folder's images, videos and codec asset folders (`discover_media`), or
    the file itself.

    MediaError naming `path` when it is missing, an empty or mixed folder, or a file of no media type."""
    if Path(path).is_file():
        media_kind(path)  # MediaError for another extension
        return [Path(path)]
    return discover_media(path, accept_folder=is_asset_folder)


def _add(cases: dict[str, ParityCase], case: ParityCase) -> None:
    """Add `case` under its golden file stem; CaseError when another case has it."""
    stem = golden_file_stem(case.id)
    if stem in cases:
        raise CaseError(
            f"two media files would share the case id or golden file {stem}: {cases[stem].path} and "
            f"{case.path} (rename one)"
        )
    cases[stem] = case


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
        """Whether a test outside any pack group (named by its id `key`) is this shard's: by a stable hash."""
        return stable_key(key) % self.count == self.index - 1

    def groups(self, groups: tuple[PackGroup, ...]) -> tuple[PackGroup, ...]:
        """This shard's pack groups, in their order: the groups are balanced by tokens over the N shards
        (`plan_workers`), so every shard gets work when there are at least N groups."""
        owner = plan_workers(groups, self.count)
        return tuple(group for group in groups if owner[group.id] == self.index - 1)


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
    """Group id -> worker (or shard) index: largest groups first, each to the least loaded worker by tokens, then
    by groups held (so groups of 0 estimated tokens spread too). The longest-processing-time-first rule (Graham,
    "Bounds on multiprocessing timing anomalies", 1969): the busiest worker carries at most 4/3 of the optimum.

    Deterministic, so the controller, every worker and every shard agree on it.
    """
    load = [(0, 0)] * max(workers, 1)
    owner = {}
    for group in sorted(groups, key=lambda g: (-g.tokens, g.id)):
        index = min(range(len(load)), key=lambda i: (load[i], i))
        owner[group.id] = index
        load[index] = (load[index][0] + group.tokens, load[index][1] + 1)
    return owner


def resolve_policy(policy: str, device: str) -> str:
    """`auto` of --determinism and --companions: `all` on the CPU, `sample` on a GPU; other values as given."""
    if policy != "auto":
        return policy
    return "sample" if device.startswith("cuda") else "all"


def by_size(case: ParityCase) -> tuple[int, str]:
    """The order behind "smallest" and "largest" in the sampling rules: estimated tokens, then the id."""
    return case.tokens, case.id


def determinism_cases(policy: str, device: str, groups: tuple[PackGroup, ...]) -> set[str]:
    """Case ids whose forwards are run a second time to check determinism.

    `all`: every case; `off`: none; `sample`: the largest image and the largest video of each pack group (long
    sequences are the likeliest to meet non-deterministic kernels); `auto`: `all` on the CPU, `sample` on a GPU.
    A rule per pack group, the unit of sharding and of worker assignment, so every worker and shard of a run
    samples the same cases whatever their number, and each of them re-runs a case of its own groups.
    """
    return _per_group_by_kind(policy, device, groups, max)


def batch_cases(policy: str, device: str, groups: tuple[PackGroup, ...]) -> set[str]:
    """Case ids whose hf features are also taken from a batch (`test_batch`), by the policy of --determinism:
    `all` every case; `off` none; `sample` the smallest image and the smallest video of all `groups` (pass the run's,
    not a shard's): a fault of batching is in the model's code, the same for every input, so one batch of each
    input form ((B, C, H, W) images, (B, C, 64, H, W) contexts with visible_indices (B, K)) shows it, on the cheapest
    cases; `auto`: `all` on the CPU, `sample` on a GPU. Chosen by the cases alone, whatever the workers and shards."""
    policy = resolve_policy(policy, device)
    if policy != "sample":
        return _per_group_by_kind(policy, device, groups, min)
    cases = [case for group in groups for case in group.cases]
    return {min(of_kind, key=by_size).id for kind in ("image", "video")
            for of_kind in [[case for case in cases if case.kind == kind]] if of_kind}


def _per_group_by_kind(policy: str, device: str, groups: tuple[PackGroup, ...], pick) -> set[str]:
    """`all`: every case of `groups`; `off`: none; `sample`: the image and the video of each group that `pick`
    (min or max) chooses by size (`by_size`)."""
    policy = resolve_policy(policy, device)
    if policy == "off":
        return set()
    if policy == "all":
        return {case.id for group in groups for case in group.cases}
    chosen = set()
    for group in groups:
        for kind in ("image", "video"):
            of_kind = [case for case in group.cases if case.kind == kind]
            if of_kind:
                chosen.add(pick(of_kind, key=by_size).id)
    return chosen


def token_order_cases(groups: tuple[PackGroup, ...]) -> set[str]:
    """Case ids fed in a shuffled token order (`test_token_order`): the smallest codec-style case of all `groups`
    (pass the run's, not a shard's). Order dependence is in a model's code, the same for every input, so one case
    of the run shows it, whatever the run's workers and shards."""
    codec = [case for group in groups for case in group.cases if case.kind == "codec"]
    return {min(codec, key=by_size).id} if codec else set()


def float32_probe_case(cases: list[ParityCase]) -> str | None:
    """The case that carries the float32 probe of a 16-bit run (`vitparity.suite.probe`): the smallest of `cases`
    (pass the run's cases whose `test_parity` is selected), one of known size where there is one; None for none."""
    if not cases:
        return None
    return min(cases, key=lambda case: (case.tokens <= 0, *by_size(case))).id


@dataclass(frozen=True)
class Probe:
    """A companion swap planned for one pack group: the pack it runs and the positions kept in each swap forward.

    `whole`: the pack is the group itself, so the group's packed forward is the swap's first pass; otherwise the
    pack is two of the group's cases and costs one forward more.
    """

    group: str
    cases: tuple[str, ...]
    kept: tuple[tuple[int, ...], ...]
    whole: bool


def companion_probes(policy: str, device: str, groups: tuple[PackGroup, ...]) -> dict[str, Probe]:
    """Group id -> its companion swap.

    `all`: every group of two or more cases, the whole pack, its even positions kept and then its odd ones
    (`vitparity.independence.alternate_halves`); `off`: none; `sample`: one two-case probe per pack group: a group
    of exactly two cases is its own probe (one swap forward, the group's packed forward reused), a larger group
    probes its two smallest cases as a pack of their own (two forwards); the larger case is kept, the other swapped.
    A group whose probe shows no leak takes its cases' packing features from its pack, on its own evidence, so the
    forwards of a group do not depend on which worker or shard runs it. `auto`: `all` on the CPU, `sample` on a GPU.
    """
    policy = resolve_policy(policy, device)
    if policy == "off":
        return {}
    if policy == "all":
        return {group.id: Probe(group.id, tuple(c.id for c in group.cases), alternate_halves(len(group.cases)), True)
                for group in groups if len(group.cases) >= 2}
    return {group.id: probe for group in groups for probe in [_pair_probe(group)] if probe is not None}


def _pair_probe(group: PackGroup) -> Probe | None:
    """The group's two smallest cases of known size (estimated tokens > 0), the larger one kept: in the group's order
    when the group is just those two, else as a pack of their own, the larger first."""
    readable = sorted((case for case in group.cases if case.tokens > 0), key=by_size)
    if len(readable) < 2:
        return None
    larger, smaller = readable[1].id, readable[0].id
    if len(group.cases) == 2:
        order = tuple(case.id for case in group.cases)
        return Probe(group.id, order, ((order.index(larger),),), True)
    return Probe(group.id, (larger, smaller), ((0,),), False)
