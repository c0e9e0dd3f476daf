"""Goldens a reviewer can read: what changed between two sets of goldens, and one golden as text.

`vitparity golden-diff OLD NEW` pairs the goldens of two folders (or of one folder at two git revisions, written
`REV:PATH`) and prints, per golden, how far NEW moved from OLD (`vitparity.snapshots.reduction_drift`: projected
cosine and relative norm difference per token, float32), token count and grid changes and provenance changes
(`vitparity.provenance_diff`). Goldens pair by their path under OLD and NEW, with the weights' fingerprint left
out of the model folder's name when that pairs them one to one, so a new release's goldens pair with the last
release's.

`vitparity golden-show FILE` prints one golden as text (provenance, shape, grid, norm statistics, checksums of
the arrays): the git textconv driver that makes `git diff` of a golden readable (see README, "Golden snapshots").
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .provenance_diff import ProvenanceDiff, flatten, provenance_diff
from .snapshots import Drift, GoldenCorrupt, GoldenFolder, load_golden, reduction_drift


class GoldenSourceError(ValueError):
    """A golden folder or git revision that cannot be read."""


@dataclass(frozen=True)
class Golden:
    """One golden read from `source` (a file path or REV:PATH): projection (N, k) float16, norms (N,) float32, meta."""

    source: str
    projection: np.ndarray
    norms: np.ndarray
    meta: dict

    @classmethod
    def read(cls, data: bytes, source: str) -> "Golden":
        """GoldenCorrupt naming `source` when the bytes are not a vitparity golden."""
        try:
            projection, norms, meta = load_golden(data)
        except GoldenCorrupt as err:
            raise GoldenCorrupt(f"{source}: {err}") from None
        return cls(source, projection, norms, meta)

    @property
    def tokens(self) -> int:
        return len(self.norms)

    @property
    def grid(self) -> str:
        return "x".join(str(n) for n in self.meta.get("grid_thw", [])) or "?"


def pair_key(relative: str) -> str:
    """A golden's path with the fingerprint left out of its model folder's name (the part goldens pair by)."""
    first, _, rest = relative.partition("/")
    folder = GoldenFolder.parse(first)
    return f"{folder.model_type}-*-{folder.settings}/{rest}" if folder and rest else relative


def _git(args: list[str]) -> bytes:
    try:
        return subprocess.run(["git", *args], check=True, capture_output=True).stdout
    except FileNotFoundError:
        raise GoldenSourceError("git is not installed") from None
    except subprocess.CalledProcessError as err:
        raise GoldenSourceError(err.stderr.decode(errors="replace").strip() or f"git {' '.join(args)} failed") from None


def golden_sources(source: str) -> dict[str, tuple[str, Callable[[], bytes]]]:
    """Relative path -> (display name, function returning the bytes) of every `.npz` under a folder or under
    `REV:PATH` (PATH relative to the current folder, read with git). GoldenSourceError when there is none."""
    folder = Path(source)
    if folder.is_dir():
        found = {str(p.relative_to(folder)): (str(p), p.read_bytes) for p in sorted(folder.rglob("*.npz"))}
    elif folder.is_file():
        raise GoldenSourceError(f"{source}: a file; give a golden folder, or REV:PATH")
    elif ":" in source:
        rev, _, path = source.partition(":")
        path = path.rstrip("/") or "."
        names = _git(["ls-tree", "-r", "--name-only", rev, "--", path]).decode().splitlines()
        base = Path(path)
        found = {}
        for name in names:
            if name.endswith(".npz"):
                relative = str(Path(name).relative_to(base)) if path != "." else name
                found[relative] = (f"{rev}:{name}", lambda rev=rev, name=name: _git(["show", f"{rev}:./{name}"]))
    else:
        raise GoldenSourceError(f"{source}: no such folder (give a golden folder, or REV:PATH read with git)")
    if not found:
        raise GoldenSourceError(f"{source}: no .npz goldens there")
    return found


@dataclass(frozen=True)
class GoldenChange:
    """One golden of OLD and NEW paired: figures of NEW against OLD (None when tokens differ or one is missing)."""

    key: str
    old: Golden | None
    new: Golden | None
    identical: bool = False
    drift: Drift | None = None
    provenance: ProvenanceDiff | None = None


def _pairs(old: set[str], new: set[str]) -> tuple[list[tuple[str, str]], set[str], set[str]]:
    """(pairs of relative paths, paths only in old, only in new): equal paths pair; of the rest, two goldens pair
    when each is the only one of its side with that `pair_key` (same model type and settings, other weights)."""
    pairs = [(path, path) for path in sorted(old & new)]
    left_old, left_new = old - new, new - old
    keyed = [{}, {}]
    for index, paths in enumerate((left_old, left_new)):
        for path in paths:
            keyed[index].setdefault(pair_key(path), []).append(path)
    for key in sorted(keyed[0].keys() & keyed[1].keys()):
        if len(keyed[0][key]) == len(keyed[1][key]) == 1:
            pairs.append((keyed[0][key][0], keyed[1][key][0]))
            left_old.discard(keyed[0][key][0])
            left_new.discard(keyed[1][key][0])
    return pairs, left_old, left_new


def diff_golden_sets(old: str, new: str) -> list[GoldenChange]:
    """Every golden of `old` and `new`, paired (`_pairs`) and compared; GoldenCorrupt names an unreadable file,
    GoldenSourceError a source that cannot be read."""
    sources = golden_sources(old), golden_sources(new)

    def read(side: int, path: str) -> tuple[bytes, Golden]:
        name, load = sources[side][path]
        data = load()
        return data, Golden.read(data, name)

    pairs, only_old, only_new = _pairs(set(sources[0]), set(sources[1]))
    changes = [GoldenChange(path, read(0, path)[1], None) for path in only_old]
    changes += [GoldenChange(path, None, read(1, path)[1]) for path in only_new]
    for path_a, path_b in pairs:
        (data_a, a), (data_b, b) = read(0, path_a), read(1, path_b)
        drift = None
        if a.projection.shape == b.projection.shape and b.tokens:
            drift = reduction_drift(b.projection, b.norms, a.projection, a.norms)
        label = path_a if path_a == path_b else pair_key(path_a)
        changes.append(GoldenChange(label, a, b, data_a == data_b, drift, provenance_diff(a.meta, b.meta)))
    return sorted(changes, key=lambda change: change.key)


def format_golden_diff(changes: list[GoldenChange], old: str, new: str, *, new_only: bool = False) -> str:
    """The changes as text: one block per golden that differs, then what is only in one source, then counts.
    `new_only`: goldens only in OLD are counted, not listed (NEW holds only what a regeneration wrote)."""
    lines = [f"goldens {old} -> {new} (NEW against OLD per token, float32: projected cosine, relative norm drift)"]
    counts = {"identical": 0, "changed": 0, "added": 0, "removed": 0}
    for change in changes:
        if change.old is None or change.new is None:
            continue
        if change.identical:
            counts["identical"] += 1
            continue
        counts["changed"] += 1
        a, b = change.old, change.new
        lines.append(change.key)
        shape = f"tokens {a.tokens}" + (f" -> {b.tokens}" if a.tokens != b.tokens else "")
        shape += f", grid {a.grid}" + (f" -> {b.grid}" if a.grid != b.grid else "")
        if change.drift is None:
            lines.append(f"  {shape}; token counts differ: no per-token figures")
        else:
            d = change.drift
            lines.append(f"  {shape}; cos min {d.min_cos:.6f} (token {d.worst_token}) mean {d.mean_cos:.6f}; "
                         f"norm drift max {d.max_norm_rel:.3e} (token {d.worst_norm_token}) mean {d.mean_norm_rel:.3e}")
        lines.extend(f"  {line}" for line in change.provenance.lines("OLD", "NEW"))
    for change in changes:
        if change.new is None:
            counts["removed"] += 1
            if not new_only:
                lines.append(f"only in OLD: {change.key}")
        elif change.old is None:
            counts["added"] += 1
            lines.append(f"only in NEW: {change.key}")
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    lines.append(summary.replace("removed", "only in OLD (not listed)") if new_only else summary)
    return "\n".join(lines)


def describe_golden(data: bytes, source: str) -> str:
    """One golden as text, for `git diff` (textconv) and review: provenance, sizes, norm statistics, checksums."""
    golden = Golden.read(data, source)
    meta, norms = golden.meta, golden.norms.astype(np.float64)
    lines = [f"vitparity golden {meta.get('side', '?')}/{meta.get('case', '?')}",
             f"tokens {golden.tokens}, feature shape {meta.get('feature_shape')}, grid {golden.grid}, "
             f"projection {list(golden.projection.shape)} {golden.projection.dtype}"]
    if golden.tokens:
        lines.append(f"norms (float32): min {norms.min():.6g} mean {norms.mean():.6g} max {norms.max():.6g}")
    for name, array in (("projection", golden.projection), ("norms", golden.norms)):
        lines.append(f"{name} sha256 {hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]}")
    lines.append("provenance:")
    lines.extend(f"  {key}: {value}" for key, value in sorted(flatten(meta).items()))
    return "\n".join(lines)
