"""How the provenance of two goldens (or of a golden and this run) differs, and the likely cause when only the
environment does.

Provenance is a golden's `meta` dict (`vitparity.snapshots.GoldenData.meta`). It is compared key by key, nested
dicts flattened to dotted keys (`versions.opencv`, `normalization.mean`), so keys added later (decoder details,
restored buffers) are compared without change here. Keys that describe the case rather than how it was made
(case, side, feature shape, grid, projection seed) are left out: the figures report them.

A key is *environment* when it names the machine or a library rather than the model, its inputs or the settings:
library versions, device, TF32, attention kernels, decoder details. When only environment keys differ, the
features were made from the same model, media and settings, so the change is the likely cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CASE_KEYS = frozenset({"case", "side", "feature_shape", "grid_thw", "projection_seed"})
# Old goldens record OpenCV's version as `opencv`, `library_versions()` as `cv2`: one name for both.
KEY_ALIASES = {"versions.cv2": "versions.opencv"}
# (key prefix or word, what a change of it may cause), most likely cause first.
ENVIRONMENT_CAUSES = (
    ("decoder", "decoded pixels may differ"),
    ("ffmpeg", "decoded pixels may differ"),
    ("codec_selection.indices_sha256", "the codec-style selection kept other tokens (decoded pixels or the rule "
                                       "changed), not the model"),
    ("codec_selection.rule", "the codec-style selection rule changed, not the model"),
    ("versions.opencv", "decoded pixels may differ"),
    ("device", "another device computes differently"),
    ("tf32", "float32 matmuls ran at another precision"),
    ("attention", "another attention kernel ran"),
    ("versions.torch", "kernels and their rounding may differ"),
    ("versions.transformers", "model and preprocessing code may differ"),
    ("versions.numpy", "preprocessing arithmetic may differ"),
    ("versions.", "library code may differ"),
    # Where the checkpoint was read from: the golden folder's name fingerprints the weights, so they are the same.
    ("model.path", "the same weights were read from another folder"),
    ("model.spec", "the same weights were named another way"),
)
LONG_VALUE = 40  # values longer than this (hashes) are shortened in the text


def flatten(meta: dict, prefix: str = "") -> dict[str, Any]:
    """{"versions": {"torch": "2.4"}} -> {"versions.torch": "2.4"}; case keys left out, aliases applied."""
    flat: dict[str, Any] = {}
    for key, value in meta.items():
        if not prefix and key in CASE_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[KEY_ALIASES.get(name, name)] = value
    return flat


def _cause(key: str) -> tuple[int, str] | None:
    """(rank, what a change of `key` may cause) for an environment key; None for a key of the model or inputs."""
    parts = key.split(".")
    for rank, (word, cause) in enumerate(ENVIRONMENT_CAUSES):
        if key.startswith(word) or word in parts:
            return rank, cause
    return None


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= LONG_VALUE else text[:16] + "..."


@dataclass(frozen=True)
class ProvenanceDiff:
    """Keys whose values differ (key, old, new), keys only one side records, and the first environment cause."""

    changed: tuple[tuple[str, Any, Any], ...]
    only_old: tuple[str, ...]
    only_new: tuple[str, ...]

    @property
    def environment_only(self) -> bool:
        """True when some key differs and every differing key is an environment key."""
        return bool(self.changed) and all(_cause(key) for key, _, _ in self.changed)

    def likely_cause(self, old: str = "golden", new: str = "this run") -> str | None:
        """"written with opencv 5.0.0, this run 4.10.0: decoded pixels may differ" (None unless environment only);
        with other labels "OLD opencv 5.0.0, NEW 4.10.0: ..."."""
        if not self.environment_only:
            return None
        key, a, b = min(self.changed, key=lambda change: _cause(change[0])[0])
        name = key.removeprefix("versions.")
        said = f"written with {name} {_text(a)}, {new} {_text(b)}" if old == "golden" else \
            f"{old} {name} {_text(a)}, {new} {_text(b)}"
        return f"{said}: {_cause(key)[1]}"

    def lines(self, old: str = "golden", new: str = "this run") -> list[str]:
        """The differences as text, one per line (none when the provenance is the same)."""
        out = [f"{key}: {_text(a)} -> {_text(b)}" for key, a, b in self.changed]
        if self.only_old:
            out.append(f"recorded only in the {old}: {', '.join(self.only_old)}")
        if self.only_new:
            out.append(f"recorded only in {new}: {', '.join(self.only_new)}")
        if not out:
            return []
        header = [f"provenance differs ({old} -> {new}):"]
        cause = self.likely_cause(old, new)
        if cause:
            return [f"only the environment differs: {cause}", *header, *(f"  {line}" for line in out)]
        return [*header, *(f"  {line}" for line in out)]


def provenance_diff(old: dict, new: dict) -> ProvenanceDiff:
    """Compare two provenance dicts (golden meta); see the module docstring for which keys count."""
    a, b = flatten(old), flatten(new)
    changed = tuple((key, a[key], b[key]) for key in sorted(a.keys() & b.keys()) if a[key] != b[key])
    return ProvenanceDiff(changed, tuple(sorted(a.keys() - b.keys())), tuple(sorted(b.keys() - a.keys())))
