"""The precision bars: limits, per dtype, on how far packing features may sit from the non-packing ones.

The seed's rule (min per-token cosine > `--threshold`, 0.99) is blind to faults that move features by less than
1 % in direction (a softmax scale 2 % off, a bias lost in conversion, weights rounded through bfloat16) and to
every change of size (features scaled by a constant keep a cosine of 1). Two more bars sit beside it:

- the **direction bar**: the mean over tokens of (1 - cosine) must not exceed a limit;
- the **magnitude bar**: the largest per-token |norm(packing) / norm(hf) - 1| must not exceed a limit.

Their defaults ("auto") depend on the dtype the models run in; docs/detection.md gives the measurements on the
ViT-L config that chose them. Only float32 defaults are tight enough to see the small faults: a bfloat16 or
float16 run gets its float32 reference from a probe (`vitparity.suite.probe`), judged by the float32 bars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Default limits ("auto") per dtype, measured on the ViT-L config with trained-like weights on the CPU
# (docs/detection.md, "Precision bars"). float32: the largest numerics-only difference (GELU tanh: mean 1-cos
# 1.8e-6, norm gap 2.2e-4) sits at about half the direction bar and a tenth of the magnitude bar; the smallest
# fault of this kind (the feature layer's MLP bias dropped: 6.7e-6) at about twice the direction bar. bfloat16: about
# 3x (direction) and 7x (magnitude) the largest numerics-only difference in bfloat16 (norm eps 1e-5: 6.7e-3,
# 1.4e-2), a guard against gross faults only: the float32 probe judges the small ones. float16 was not measured and
# takes bfloat16's limits (float16 rounds 8x finer, so they are looser than it needs).
DEFAULT_COS_GAP = {"float32": 3.5e-6, "bfloat16": 2e-2, "float16": 2e-2}
DEFAULT_NORM_GAP = {"float32": 2e-3, "bfloat16": 1e-1, "float16": 1e-1}
AUTO, OFF = "auto", "off"
BAR_DTYPES = tuple(DEFAULT_COS_GAP)


def parse_bar(value: str, name: str) -> str | float:
    """An option's text -> "auto", "off" or a limit (a finite number > 0). ValueError naming `name` otherwise."""
    text = str(value).strip().lower()
    if text in (AUTO, OFF):
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{name}={value}: use auto, off or a positive number") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name}={value}: a limit must be a finite number > 0 (or off)")
    return number


@dataclass(frozen=True)
class Bars:
    """The limits a comparison is judged by; None: that bar is off. `dtype`: the dtype whose defaults they are
    (named in reports: "float32 bars")."""

    cos_gap: float | None
    norm_gap: float | None
    dtype: str

    @classmethod
    def for_dtype(cls, dtype: str, cos_gap: str | float = AUTO, norm_gap: str | float = AUTO) -> Bars:
        """The bars of a run in `dtype` ("float32", "bfloat16", "float16"): each setting "auto" (the default of
        the dtype), "off" or a number. ValueError for an unknown dtype."""
        if dtype not in BAR_DTYPES:
            raise ValueError(f"no precision bars for dtype {dtype!r}; known: {BAR_DTYPES}")

        def limit(setting: str | float, defaults: dict[str, float]) -> float | None:
            if setting == OFF:
                return None
            return defaults[dtype] if setting == AUTO else float(setting)

        return cls(limit(cos_gap, DEFAULT_COS_GAP), limit(norm_gap, DEFAULT_NORM_GAP), dtype)

    def describe(self) -> str:
        """`float32 bars: mean 1-cos <= 2e-06, norm gap <= 0.001` (or `off`)."""
        parts = [f"mean 1-cos <= {self.cos_gap:g}" if self.cos_gap is not None else "mean 1-cos bar off",
                 f"norm gap <= {self.norm_gap:g}" if self.norm_gap is not None else "norm gap bar off"]
        return f"{self.dtype} bars: " + ", ".join(parts)

    def reasons(self, cos_gap: float, norm_gap: float) -> list[str]:
        """Why features with these figures fail the bars (empty: they pass). A non-finite figure fails a bar that
        is on."""
        found = []
        if self.cos_gap is not None and not cos_gap <= self.cos_gap:
            found.append(f"mean 1-cos {cos_gap:.3e} > {self.cos_gap:g} ({self.dtype} direction bar)")
        if self.norm_gap is not None and not norm_gap <= self.norm_gap:
            found.append(f"norm gap {norm_gap:.3e} > {self.norm_gap:g} ({self.dtype} magnitude bar)")
        return found


def margin(value: float, limit: float | None) -> str:
    """How a figure sits against its bar: `0.012 of the bar`, `off` when there is no bar, `n/a` when not finite."""
    if limit is None:
        return "off"
    if not math.isfinite(value):
        return "n/a"
    return f"{value / limit:.3g} of the bar"
