"""Tests for vitparity.compare (numpy only, no GPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vitparity.checks import odd_pass
from vitparity.compare import DEFAULT_THRESHOLD, Comparison, below_threshold, compare_features, cosine_per_token

N, D = 64, 32


def _features(seed: int = 0, n: int = N, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _reference_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain float64 cosine per row, as an independent reference."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def _rotate(v: np.ndarray, cos: float, seed: int = 1) -> np.ndarray:
    """Return a vector with the norm of ``v`` at cosine ``cos`` to ``v``."""
    v64 = v.astype(np.float64)
    u = np.random.default_rng(seed).standard_normal(v.shape)
    u -= u @ v64 / (v64 @ v64) * v64
    u *= np.linalg.norm(v64) / np.linalg.norm(u)
    return (cos * v64 + math.sqrt(1 - cos**2) * u).astype(np.float32)


def test_identical_arrays_pass() -> None:
    a = _features()
    c = compare_features(a, a.copy(), name="same")
    assert c.passed and c.reason == ""
    assert c.min_cos == pytest.approx(1.0, abs=1e-6)
    assert c.max_abs == 0.0 and c.mean_abs == 0.0
    assert c.threshold == DEFAULT_THRESHOLD
    assert c.token_cos is not None and c.token_cos.shape == (N,) and c.token_cos.dtype == np.float32


def test_one_changed_token_fails_with_its_cosine() -> None:
    a = _features()
    b = a.copy()
    b[17] = _rotate(a[17], 0.5)
    c = compare_features(a, b)
    assert not c.passed
    assert c.min_cos == pytest.approx(0.5, abs=1e-5)
    assert int(np.argmin(c.token_cos)) == 17
    assert c.max_cos == pytest.approx(1.0, abs=1e-6)
    assert c.reason == f"min cosine {c.min_cos:.9f} <= threshold 0.99"


def test_token_cos_matches_reference_and_is_read_only() -> None:
    a, b = _features(0), _features(1)
    c = compare_features(a, b, threshold=-2.0)
    np.testing.assert_allclose(c.token_cos, _reference_cos(a, b), atol=1e-6)
    assert c.mean_cos == pytest.approx(_reference_cos(a, b).mean(), abs=1e-6)
    assert c.max_abs == pytest.approx(np.abs(a - b).max(), rel=1e-6)
    assert c.mean_abs == pytest.approx(np.abs(a - b).mean(), rel=1e-5)
    with pytest.raises(ValueError):
        c.token_cos[0] = 0.0


@pytest.mark.parametrize(("scale", "passed"), [(1e-3, True), (1e-2, True), (0.5, False), (2.0, False)])
def test_uniform_noise_against_default_threshold(scale: float, passed: bool) -> None:
    a = _features()
    b = a + np.random.default_rng(3).uniform(-scale, scale, a.shape).astype(np.float32)
    c = compare_features(a, b)
    expected = _reference_cos(a, b).min()
    assert c.min_cos == pytest.approx(expected, abs=1e-5)
    assert bool(expected > DEFAULT_THRESHOLD) is passed
    assert c.passed is passed


def test_uniform_noise_either_side_of_threshold() -> None:
    a = _features()
    b = a + np.random.default_rng(4).uniform(-0.05, 0.05, a.shape).astype(np.float32)
    expected = float(_reference_cos(a, b).min())
    assert compare_features(a, b, threshold=expected - 1e-4).passed
    below = compare_features(a, b, threshold=expected + 1e-4)
    assert not below.passed and below.reason.startswith("min cosine ")


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_equal_tokens_have_cosine_one_at_any_threshold(as_tensor: bool) -> None:
    """Identical features pass any threshold below 1 (float32 gives some rows 1 - ulp); a failure shows the gap."""
    a = _features(n=512, d=1024) * 37
    x = torch.from_numpy(a) if as_tensor else a
    same = compare_features(x, torch.from_numpy(a.copy()) if as_tensor else a.copy(), threshold=0.9999999)
    assert same.passed and same.min_cos == 1.0 and same.max_abs == 0.0
    b = a.copy()
    b[5] = _rotate(a[5], 0.9999996)  # shown as 1.000000 with six digits
    near = compare_features(x, torch.from_numpy(b) if as_tensor else b, threshold=0.9999999)
    assert not near.passed and near.min_cos < 0.9999999
    assert near.reason == f"min cosine {near.min_cos:.9f} <= threshold 0.9999999" and "0.99999" in near.reason


def test_threshold_is_strict() -> None:
    a = _features()
    assert not compare_features(a, a, threshold=1.0).passed
    b = a.copy()
    b[3] = _rotate(a[3], 0.995)
    at = compare_features(a, b)
    assert at.passed
    assert not compare_features(a, b, threshold=at.min_cos).passed
    assert compare_features(a, b, threshold=float(np.nextafter(at.min_cos, -1.0))).passed


@pytest.mark.parametrize(
    ("shape_b", "reason"),
    [
        ((N - 1, D), f"token count differs: hf {N} vs packing {N - 1}"),
        ((N, D + 1), f"hidden size differs: hf {D} vs packing {D + 1}"),
        ((N + 2, D - 1), f"token count differs: hf {N} vs packing {N + 2}; hidden size differs"),
    ],
)
def test_shape_mismatch_fails_without_truncation(shape_b: tuple[int, int], reason: str) -> None:
    a = _features(n=N + 2, d=D + 1)[:N, :D]
    b = _features(n=N + 2, d=D + 1)[: shape_b[0], : shape_b[1]]
    c = compare_features(a, b)
    assert not c.passed
    assert c.reason.startswith(reason)
    assert c.shape_a == (N, D) and c.shape_b == shape_b
    assert c.token_cos is None and math.isnan(c.min_cos) and math.isnan(c.max_abs)


@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_fails_naming_side(side: int, bad: float, word: str) -> None:
    arrays = [_features(), _features()]
    arrays[side][[2, 5, 9], [0, 1, 2]] = bad
    c = compare_features(*arrays, threshold=-2.0, labels=("ref", "test"))
    assert not c.passed
    label, other = ("ref", "test") if side == 0 else ("test", "ref")
    assert c.reason == f"{word} in {label} features (3 values)"
    assert other not in c.reason
    assert math.isfinite(c.min_cos) and c.token_cos is not None
    assert int(np.isnan(c.token_cos).sum()) == 3


def test_float32_overflow_is_reported() -> None:
    a = _features().astype(np.float64)
    b = a.copy()
    b[0, 0] = 1e39
    c = compare_features(a, b, threshold=-2.0)
    assert not c.passed and c.reason == "float32 overflow in packing features (1 value)"


def test_batch_of_one_is_squeezed() -> None:
    a = _features()
    for x, y in [(a[None], a), (a, a[None]), (a[None], a[None])]:
        c = compare_features(x, y)
        assert c.passed, c.reason
        assert c.token_cos.shape == (N,)
    assert compare_features(a[None], a).shape_a == (1, N, D)


def test_batch_larger_than_one_fails() -> None:
    a = _features()
    c = compare_features(np.stack([a, a]), np.stack([a, a]))
    assert not c.passed
    assert "batch size 2 in hf features (expected 1)" in c.reason
    assert "batch size 2 in packing features" in c.reason


@pytest.mark.parametrize("shape", [(D,), (1, 1, N, D)])
def test_other_ranks_fail(shape: tuple[int, ...]) -> None:
    c = compare_features(np.ones(shape), np.ones(shape))
    assert not c.passed and "must be (N, D) or (1, N, D)" in c.reason


@pytest.mark.parametrize("shape", [(0, D), (1, 0, D), (N, 0)])
def test_empty_features_fail(shape: tuple[int, ...]) -> None:
    c = compare_features(np.zeros(shape), np.zeros(shape))
    assert not c.passed and c.reason.startswith("empty features")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_input_dtypes(dtype: type) -> None:
    a = (_features() * 10).astype(dtype)
    c = compare_features(a, a.astype(np.float64))
    assert c.passed and c.token_cos.dtype == np.float32


def test_zero_tokens() -> None:
    a = _features()
    b = a.copy()
    a[4] = 0.0
    b[4] = 0.0
    assert compare_features(a, b).passed
    b[4, 0] = 1e-3
    c = compare_features(a, b, threshold=-0.5)
    assert c.token_cos[4] == 0.0 and c.min_cos == 0.0


def test_cosine_per_token() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1e30, 1e30]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0], [1e30, 1e30]])
    np.testing.assert_allclose(cosine_per_token(a, b), [0.0, 1.0, 1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(cosine_per_token([[1.0, 0.0]], [[-3.0, 0.0]]), [-1.0])
    with pytest.raises(ValueError):
        cosine_per_token(np.ones((3, 4)), np.ones((3, 5)))


def test_row_is_json_serialisable() -> None:
    a = _features()
    c = compare_features(a, a[:-1], name="case")
    row = json.loads(json.dumps(c.row(), allow_nan=False))
    assert row["passed"] is False and row["min_cos"] is None
    assert row["shape_b"] == [N - 1, D] and row["name"] == "case"
    assert "token_cos" not in row
    assert isinstance(c, Comparison)


def test_invalid_arguments() -> None:
    a = _features()
    with pytest.raises(ValueError):
        compare_features(a, a, threshold=math.nan)
    with pytest.raises(TypeError):
        compare_features(np.array([["x"]]), np.array([["x"]]))


def test_torch_tensors_give_the_numpy_verdict_and_figures() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((50, 32)).astype(np.float32)
    b = a + 0.3 * rng.standard_normal((50, 32)).astype(np.float32)
    b[7] = -a[7]
    host = compare_features(a, b, name="x", threshold=0.5)
    device = compare_features(torch.from_numpy(a)[None], torch.from_numpy(b), name="x", threshold=0.5)
    assert device.passed is host.passed is False
    assert (device.reason, host.reason) == (below_threshold(device.min_cos, 0.5), below_threshold(host.min_cos, 0.5))
    assert device.shape_a == (1, 50, 32) and device.shape_b == (50, 32)
    np.testing.assert_allclose(device.token_cos, host.token_cos, atol=1e-6)
    for stat in ("min_cos", "mean_cos", "max_cos", "max_abs", "mean_abs"):
        assert getattr(device, stat) == pytest.approx(getattr(host, stat), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("bad", ["nan", "inf", "shape"])
def test_torch_tensors_with_bad_values_or_shapes_get_the_full_diagnostics(bad) -> None:
    torch = pytest.importorskip("torch")
    a = torch.ones(4, 8)
    b = torch.ones(4, 8)
    if bad == "nan":
        b[1, 2] = float("nan")
    elif bad == "inf":
        b[0, 0] = float("inf")
    else:
        b = torch.ones(3, 8)
    result = compare_features(a, b)
    assert not result.passed
    assert {"nan": "NaN in packing", "inf": "Inf in packing", "shape": "token count differs"}[bad] in result.reason


def test_descriptions_of_a_pass_that_did_not_repeat() -> None:
    from vitparity.checks import feature_difference, pixel_difference

    frames = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    changed = frames.copy()
    changed[1, 2, 3] = (0, 5, 255)
    assert pixel_difference(frames, changed) == "2 of 96 values differ, by up to 255"
    assert pixel_difference(frames, frames[:1]) == "shape (2, 4, 4, 3) vs (1, 4, 4, 3)"
    first = torch.ones(3, 4)
    second = first.clone()
    second[2, 0] = 1.5
    assert feature_difference(first, second) == "max abs difference 5.000e-01, 1 of 3 tokens differ, min cos 0.9819805"
    assert feature_difference(first, first[:2]) == "token count differs: first pass 3 vs second pass 2"


def test_a_third_pass_names_the_odd_one() -> None:
    first = torch.ones(4, 8)
    other = first.clone()
    other[2, 3] += 1e-3
    assert odd_pass(first, other, first.clone()).endswith("the second pass was the odd one")
    assert odd_pass(other, first, first.clone()).endswith("the first pass was the odd one")
    third = first.clone()
    third[0, 0] -= 1e-3
    assert "every pass differs" in odd_pass(first, other, third)
