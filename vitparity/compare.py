"""Numeric comparison of two feature arrays of shape (N, D) or (1, N, D)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .choices import DEFAULT_THRESHOLD
from .precision import Bars

# The same model on the same sample, run alone or packed with others: min per-token cosine must exceed this.
# Tighter than the packing-vs-non-packing threshold; looser in half precision, where kernels tile
# sequences of different lengths differently.
NEIGHBOUR_MIN_COS = {"float32": 0.99999, "float16": 0.999, "bfloat16": 0.999}


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing two feature arrays token by token.

    ``shape_a``/``shape_b`` are the shapes as given (before squeezing a batch
    of 1).  Statistics are ``nan`` when they cannot be computed (bad or
    mismatched shapes); with NaN/Inf inputs they cover only the finite values.
    """

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    threshold: float
    passed: bool
    reason: str
    min_cos: float
    mean_cos: float
    max_cos: float
    max_abs: float
    mean_abs: float
    token_cos: np.ndarray | None = field(default=None, repr=False, compare=False)
    labels: tuple[str, str] = ("hf", "packing")
    norm_gap: float = math.nan  # largest per-token |norm(b) / norm(a) - 1|
    bars: Bars | None = None  # the precision bars it was judged by (None: the threshold only)

    @property
    def cos_gap(self) -> float:
        """Mean over tokens of (1 - cosine), the figure the direction bar limits."""
        return 1.0 - self.mean_cos

    def row(self) -> dict[str, Any]:
        """JSON-serialisable summary; non-finite numbers become ``None``."""

        def num(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "name": self.name,
            "labels": list(self.labels),
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "threshold": self.threshold,
            "passed": self.passed,
            "reason": self.reason,
            "min_cos": num(self.min_cos),
            "mean_cos": num(self.mean_cos),
            "max_cos": num(self.max_cos),
            "max_abs": num(self.max_abs),
            "mean_abs": num(self.mean_abs),
            "cos_gap": num(self.cos_gap),
            "norm_gap": num(self.norm_gap),
            "cos_gap_bar": self.bars.cos_gap if self.bars else None,
            "norm_gap_bar": self.bars.norm_gap if self.bars else None,
            "bar_dtype": self.bars.dtype if self.bars else None,
        }


def _as_real_array(x: ArrayLike) -> np.ndarray:
    """Return ``x`` as an ndarray, rejecting non-real dtypes."""
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"expected a real numeric array, got dtype {arr.dtype}")
    return arr


def _to_float32(arr: np.ndarray) -> np.ndarray:
    """Cast to float32; values beyond the float32 range become Inf."""
    with np.errstate(over="ignore"):
        return arr.astype(np.float32, copy=False)


def _row_normalised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each row by its max |value| (overflow guard); return rows and their norms."""
    scale = np.max(np.abs(x), axis=-1, keepdims=True, initial=0)
    scaled = x / np.where(scale > 0, scale, 1)
    return scaled, np.sqrt(np.sum(scaled * scaled, axis=-1))


def below_threshold(min_cos: float, threshold: float) -> str:
    """The failure reason of a minimum cosine at or below the threshold, with the digits that show the gap (float32
    resolves cosines near 1 to about 6e-8)."""
    return f"min cosine {min_cos:.9f} <= threshold {threshold}"


def cosine_per_token(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Cosine similarity along the last axis of two equally shaped arrays, in float32.

    Two all-zero vectors count as 1.0, an all-zero against a non-zero vector as
    0.0, two equal finite vectors as exactly 1.0.  Results are clipped to [-1, 1]; NaN/Inf in a vector gives NaN.
    """
    xa = _to_float32(_as_real_array(a))
    xb = _to_float32(_as_real_array(b))
    if xa.shape != xb.shape:
        raise ValueError(f"shapes differ: {xa.shape} vs {xb.shape}")
    if xa.ndim == 0:
        raise ValueError("expected at least one axis (the hidden dimension)")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        dot = np.einsum("...d,...d->...", xa, xb)
        na = np.sqrt(np.einsum("...d,...d->...", xa, xa))
        nb = np.sqrt(np.einsum("...d,...d->...", xb, xb))
        overflow = ~(np.isfinite(dot) & np.isfinite(na) & np.isfinite(nb))
        if overflow.any():  # only rows with huge or non-finite values pay for the max-abs rescaling
            rows_a, scaled_na = _row_normalised(xa[overflow])
            rows_b, scaled_nb = _row_normalised(xb[overflow])
            dot, na, nb = dot.copy(), na.copy(), nb.copy()
            dot[overflow] = np.einsum("...d,...d->...", rows_a, rows_b)
            na[overflow], nb[overflow] = scaled_na, scaled_nb
        cos = np.clip(dot / (na * nb), -1.0, 1.0)
        equal = np.all((xa == xb) & np.isfinite(xa), axis=-1)
        cos = np.where(equal, np.float32(1.0), cos)  # equal finite tokens: exactly 1, not 1 - ulp
    zero_a, zero_b = na == 0, nb == 0
    cos = np.where(zero_a & zero_b, 1.0, np.where(zero_a | zero_b, 0.0, cos))
    cos = np.where(np.isfinite(na) & np.isfinite(nb), cos, np.nan)
    return np.asarray(cos, dtype=np.float32)


def norm_gap_per_token(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|norm(b) / norm(a) - 1| per token of two equally shaped float32 arrays (N, D), in float64: 0 for two zero
    tokens, inf for a zero token against a non-zero one."""
    na = np.sqrt(np.einsum("...d,...d->...", a, a, dtype=np.float64))
    nb = np.sqrt(np.einsum("...d,...d->...", b, b, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(nb / na - 1.0)
    return np.where(na == 0, np.where(nb == 0, 0.0, np.inf), gap)


def _squeeze_batch(arr: np.ndarray, label: str) -> tuple[np.ndarray | None, str]:
    """Reduce (1, N, D) to (N, D); return (None, reason) for any other layout."""
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            return None, f"batch size {arr.shape[0]} in {label} features (expected 1)"
        return arr[0], ""
    if arr.ndim == 2:
        return arr, ""
    return None, f"{label} features must be (N, D) or (1, N, D), got shape {arr.shape}"


def _non_finite_reasons(raw: np.ndarray, cast: np.ndarray, label: str) -> list[str]:
    """Describe NaN/Inf values in ``raw`` and finite values that overflow in ``cast``."""
    if np.isfinite(cast.sum(dtype=np.float64) if cast.size else 0.0):  # fast path: a sum is finite only when all are
        return []
    inf_cast = np.isinf(cast)
    counts = (
        ("NaN in", int(np.count_nonzero(np.isnan(cast)))),
        ("Inf in", int(np.count_nonzero(inf_cast & np.isinf(raw)))),
        ("float32 overflow in", int(np.count_nonzero(inf_cast & np.isfinite(raw)))),
    )
    return [f"{what} {label} features ({n} value{'s' * (n != 1)})" for what, n in counts if n]


def _nan_stat(func: Callable[[np.ndarray], Any], values: np.ndarray, all_finite: bool = False) -> float:
    """Apply ``func`` over the finite entries of ``values``; nan if there are none."""
    finite = values if all_finite else values[np.isfinite(values)]
    return float(func(finite)) if finite.size else math.nan


def compare_features(
    a: ArrayLike,
    b: ArrayLike,
    *,
    name: str = "",
    threshold: float = DEFAULT_THRESHOLD,
    labels: tuple[str, str] = ("hf", "packing"),
    bars: Bars | None = None,
) -> Comparison:
    """Compare features ``a`` and ``b`` token by token.

    Passes only when shapes agree (after squeezing a batch of 1), every value
    is finite, there is at least one token, the minimum per-token cosine
    is strictly greater than ``threshold`` and, with ``bars``, the mean
    (1 - cosine) and the largest per-token |norm(b) / norm(a) - 1| are within
    them (`vitparity.precision.Bars`).  Shapes are never truncated.
    """
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    if _is_tensor(a) and _is_tensor(b):
        fast = _compare_on_device(a, b, name=name, threshold=threshold, labels=labels, bars=bars)
        if fast is not None:
            return fast
        a, b = a.detach().float().cpu().numpy(), b.detach().float().cpu().numpy()
    raw_a, raw_b = _as_real_array(a), _as_real_array(b)
    cast_a, cast_b = _to_float32(raw_a), _to_float32(raw_b)
    label_a, label_b = labels
    nan = math.nan

    def result(reasons: list[str], stats: tuple[float, ...], cos: np.ndarray | None, norm_gap: float = nan
               ) -> Comparison:
        return Comparison(
            name, tuple(raw_a.shape), tuple(raw_b.shape), threshold, not reasons,
            "; ".join(reasons), *stats, token_cos=cos, labels=(label_a, label_b), norm_gap=norm_gap, bars=bars,
        )

    xa, reason_a = _squeeze_batch(cast_a, label_a)
    xb, reason_b = _squeeze_batch(cast_b, label_b)
    reasons = [r for r in (reason_a, reason_b) if r]
    if xa is not None and xb is not None:
        if xa.shape[0] != xb.shape[0]:
            reasons.append(f"token count differs: {label_a} {xa.shape[0]} vs {label_b} {xb.shape[0]}")
        if xa.shape[1] != xb.shape[1]:
            reasons.append(f"hidden size differs: {label_a} {xa.shape[1]} vs {label_b} {xb.shape[1]}")
    reasons += _non_finite_reasons(raw_a, cast_a, label_a)
    reasons += _non_finite_reasons(raw_b, cast_b, label_b)
    if xa is None or xb is None or xa.shape != xb.shape:
        return result(reasons, (nan,) * 5, None)
    if xa.size == 0:
        reasons.append(f"empty features: shape {xa.shape}")
        return result(reasons, (nan,) * 5, None)

    token_cos = cosine_per_token(xa, xb)
    token_cos.setflags(write=False)
    with np.errstate(invalid="ignore", over="ignore"):
        abs_diff = np.abs(xa - xb)
    finite = not reasons  # no NaN, Inf or overflow in either input
    stats = (
        _nan_stat(np.min, token_cos),
        _nan_stat(lambda v: np.mean(v, dtype=np.float64), token_cos),
        _nan_stat(np.max, token_cos),
        _nan_stat(np.max, abs_diff, finite),
        _nan_stat(lambda v: np.mean(v, dtype=np.float64), abs_diff, finite),
    )
    norm_gap = _nan_stat(np.max, norm_gap_per_token(xa, xb), finite) if finite else nan
    min_cos = stats[0]
    if not reasons:
        if not min_cos > threshold:
            reasons.append(below_threshold(min_cos, threshold))
        if bars is not None:
            reasons += bars.reasons(1.0 - stats[1], norm_gap)
    return result(reasons, stats, token_cos, norm_gap)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def _compare_on_device(a, b, *, name: str, threshold: float, labels: tuple[str, str],
                       bars: Bars | None) -> Comparison | None:
    """`compare_features` of two torch tensors where they are (e.g. on the GPU), copying only per-token cosines.

    Covers the common case: equal (N, D) or (1, N, D) shapes with every value finite in float32. Returns None
    for anything else, and the caller compares host copies with the full set of diagnostics.
    """
    import torch

    shape_a, shape_b = tuple(a.shape), tuple(b.shape)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if b.ndim == 3 and b.shape[0] == 1:
        b = b[0]
    if a.ndim != 2 or a.shape != b.shape or a.numel() == 0:
        return None
    xa, xb = a.detach().float(), b.detach().to(device=a.device, dtype=torch.float32)
    dot = torch.linalg.vecdot(xa, xb)
    na, nb = torch.linalg.vector_norm(xa, dim=-1), torch.linalg.vector_norm(xb, dim=-1)
    abs_diff = (xa - xb).abs()
    na64, nb64 = torch.linalg.vector_norm(xa.double(), dim=-1), torch.linalg.vector_norm(xb.double(), dim=-1)
    gap = torch.where(na64 == 0, torch.where(nb64 == 0, 0.0, math.inf), (nb64 / na64 - 1.0).abs())
    summary = torch.stack([dot.sum(), na.sum(), nb.sum(), abs_diff.max(), abs_diff.mean(dtype=torch.float64).float()])
    summary = summary.cpu().tolist()
    norm_gap = float(gap.max())
    if not all(math.isfinite(v) for v in summary):  # NaN, Inf or overflow somewhere: full diagnostics on the host
        return None
    cos = (dot / (na * nb)).clamp(-1.0, 1.0)
    cos = torch.where((xa == xb).all(dim=-1), 1.0, cos)  # equal tokens: exactly 1, not 1 - ulp
    zero_a, zero_b = na == 0, nb == 0
    cos = torch.where(zero_a & zero_b, 1.0, torch.where(zero_a | zero_b, 0.0, cos))
    token_cos = cos.cpu().numpy().astype(np.float32)
    token_cos.setflags(write=False)
    min_cos, mean_cos = float(token_cos.min()), float(np.mean(token_cos, dtype=np.float64))
    reasons = [] if min_cos > threshold else [below_threshold(min_cos, threshold)]
    if bars is not None:
        reasons += bars.reasons(1.0 - mean_cos, norm_gap)
    return Comparison(
        name, shape_a, shape_b, threshold, not reasons, "; ".join(reasons),
        min_cos, mean_cos, float(token_cos.max()), summary[3], summary[4],
        token_cos=token_cos, labels=labels, norm_gap=norm_gap, bars=bars,
    )


def comparison_from_row(row: dict[str, Any]) -> Comparison:
    """Rebuild a Comparison (without per-token cosines) from `Comparison.row()`, e.g. sent by an xdist worker."""

    def num(value: float | None) -> float:
        return float("nan") if value is None else float(value)

    return Comparison(
        name=row["name"],
        shape_a=tuple(row["shape_a"]),
        shape_b=tuple(row["shape_b"]),
        threshold=row["threshold"],
        passed=row["passed"],
        reason=row["reason"],
        min_cos=num(row["min_cos"]),
        mean_cos=num(row["mean_cos"]),
        max_cos=num(row["max_cos"]),
        max_abs=num(row["max_abs"]),
        mean_abs=num(row["mean_abs"]),
        labels=tuple(row["labels"]),
        norm_gap=num(row.get("norm_gap")),
        bars=Bars(row["cos_gap_bar"], row["norm_gap_bar"], row["bar_dtype"]) if row.get("bar_dtype") else None,
    )
