"""Tests for vitparity.report (numpy + OpenCV only, no GPU)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from vitparity.compare import Comparison, compare_features
from vitparity.report import (
    HEATMAP_GAP,
    HEATMAP_HEADER,
    HEATMAP_LEGEND,
    HEATMAP_MARGIN,
    HEATMAP_NAN_BGR,
    cosine_to_level,
    format_report,
    format_table,
    write_cosine_heatmap,
)


def _features(n: int = 16, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.fixture
def comparisons() -> list[Comparison]:
    a = _features()
    b = a.copy()
    b[0, 0] += 0.05
    flipped = a.copy()
    flipped[3] = -flipped[3]
    return [
        compare_features(a, b, name="astronaut.jpg"),
        compare_features(a, flipped, name="cat.png"),
        compare_features(a, a[:-1], name="video.mp4"),
    ]


def test_report_blocks_and_summary(comparisons: list[Comparison]) -> None:
    text = format_report(comparisons, title="hf vs packing")
    lines = text.splitlines()
    assert lines[0] == "hf vs packing"
    assert "[1] astronaut.jpg" in lines and "[3] video.mp4" in lines
    assert "  shapes: hf (16, 8)  packing (15, 8)" in lines
    assert "max abs diff: 5.000e-02" in text
    assert [ln.strip()[:4] for ln in lines if ln.strip().startswith(("PASS", "FAIL"))] == [
        "PASS",
        "FAIL",
        "FAIL",
    ]
    assert f"  FAIL: min cosine {comparisons[1].min_cos:.9f} <= threshold 0.99" in lines
    assert comparisons[1].min_cos == pytest.approx(-1.0, abs=1e-6)
    assert "  FAIL: token count differs: hf 16 vs packing 15" in lines
    assert "cosine per token: min n/a  mean n/a  max n/a" in text
    assert lines[-1] == "Summary: 3 inputs, 1 passed, 2 failed"


def test_report_pass_line_shows_digits_beyond_threshold() -> None:
    c = Comparison("edge", (4, 2), (4, 2), 0.99, True, "", 0.9900000095, 0.995, 1.0, 1e-3, 1e-4)
    text = format_report([c])
    assert "  PASS (min cosine 0.99000001 > 0.99)" in text.splitlines()
    assert "min 0.990000  mean 0.995000  max 1.000000" in text
    assert text.splitlines()[-1] == "Summary: 1 inputs, 1 passed, 0 failed"


def test_report_uses_labels_and_handles_empty() -> None:
    a = _features()
    c = compare_features(a, a, name="x", labels=("ref", "test"))
    assert "shapes: ref (16, 8)  test (16, 8)" in format_report([c])
    assert format_report([]) == "Summary: 0 inputs, 0 passed, 0 failed"


def test_table_rows_are_aligned(comparisons: list[Comparison]) -> None:
    lines = format_table(comparisons).splitlines()
    assert len(lines) == 2 + len(comparisons)
    header = lines[0]
    for column in ("case", "tokens", "max abs", "mean abs", "min cos", "mean cos", "verdict"):
        assert column in header
    verdict_at = header.index("verdict")
    rows = lines[2:]
    assert [r[verdict_at:].split(":")[0] for r in rows] == ["PASS", "FAIL", "FAIL"]
    assert rows[0].startswith("astronaut.jpg")
    assert "16/15" in rows[2] and " n/a " in rows[2]
    assert "5.000e-02" in rows[0]


def test_table_shortens_long_names_and_reasons() -> None:
    a = _features()
    c = compare_features(a, a[:, :-1], name="n" * 100)
    row = format_table([c], case_width=20, verdict_width=25).splitlines()[2]
    assert row.startswith("n" * 17 + "...")
    assert row.endswith("...")
    assert row[row.index("FAIL"):] == "FAIL: hidden size diff..."


def test_cosine_to_level_scale() -> None:
    levels = cosine_to_level(np.array([1.0, 1 - 1e-7, 0.9999, 0.99, 0.0, -1.0, np.nan]))
    assert levels.dtype == np.uint8
    assert levels.tolist() == [0, 0, 85, 170, 255, 255, 255]


def test_heatmap_layout_and_content(tmp_path: Path) -> None:
    t, h, w, cell = 3, 4, 9, 16
    cos = np.ones(t * h * w, dtype=np.float32)
    bad = 1 * h * w + 2 * w + 7  # frame 1, row 2, column 7
    cos[bad] = 0.5
    cos[2 * h * w] = np.nan  # frame 2, row 0, column 0
    path = tmp_path / "nested" / "dir" / "heat.png"
    out = write_cosine_heatmap(cos, (t, h, w), path, title="astronaut.jpg")
    assert out == path and path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    expected_w = 2 * HEATMAP_MARGIN + t * w * cell + (t - 1) * HEATMAP_GAP
    expected_h = HEATMAP_HEADER + h * cell + HEATMAP_MARGIN + HEATMAP_LEGEND
    assert image.shape == (expected_h, expected_w, 3)

    def pixel(frame: int, row: int, col: int) -> tuple[int, ...]:
        y = HEATMAP_HEADER + row * cell + cell // 2
        x = HEATMAP_MARGIN + frame * (w * cell + HEATMAP_GAP) + col * cell + cell // 2
        return tuple(int(v) for v in image[y, x])

    good = pixel(0, 0, 0)
    assert pixel(0, 2, 7) == good and pixel(2, 2, 7) == good
    assert pixel(1, 2, 7) != good
    assert pixel(2, 0, 0) == HEATMAP_NAN_BGR
    colours = cv2.applyColorMap(np.array([[0, 255]], dtype=np.uint8), cv2.COLORMAP_TURBO)
    assert good == tuple(int(v) for v in colours[0, 0])


def test_heatmap_many_frames_wrap_into_rows(tmp_path: Path) -> None:
    t, h, w, cell, cols = 10, 4, 4, 16, 8
    out = write_cosine_heatmap(np.full(t * h * w, 0.999), (t, h, w), tmp_path / "video.png")
    image = cv2.imread(str(out))
    expected_w = 2 * HEATMAP_MARGIN + cols * w * cell + (cols - 1) * HEATMAP_GAP
    expected_h = HEATMAP_HEADER + 2 * h * cell + HEATMAP_GAP + HEATMAP_MARGIN + HEATMAP_LEGEND
    assert image.shape == (expected_h, expected_w, 3)


@pytest.mark.parametrize(
    ("token_cos", "grid"),
    [
        (np.ones(35), (1, 6, 6)),
        (np.ones(37), (1, 6, 6)),
        (np.ones((6, 6)), (1, 6, 6)),
        (np.ones(0), (0, 6, 6)),
    ],
)
def test_heatmap_rejects_bad_input(tmp_path: Path, token_cos: np.ndarray, grid: tuple[int, int, int]) -> None:
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError):
        write_cosine_heatmap(token_cos, grid, path)
    assert not path.exists()


def test_tables_put_failures_first_then_the_lowest_cosine_and_name_the_worst_case() -> None:
    from vitparity.compare import comparison_from_row
    from vitparity.report import format_table, worst_case_line, worst_first

    def row(name: str, min_cos: float | None, passed: bool) -> dict:
        return {"name": name, "labels": ["hf", "packing"], "shape_a": [4, 8], "shape_b": [4, 8], "threshold": 0.99,
                "passed": passed, "reason": "" if passed else "min cosine below", "min_cos": min_cos,
                "mean_cos": min_cos, "max_cos": 1.0, "max_abs": 0.5, "mean_abs": 0.1}

    comparisons = [comparison_from_row(r) for r in (row("a-pass-low", 0.991, True), row("b-fail", 0.95, False),
                                                    row("c-pass", 0.9999, True), row("d-fail-nan", None, False),
                                                    row("e-fail-worse", 0.5, False))]
    ordered = [c.name for c in worst_first(comparisons)]
    assert ordered == ["d-fail-nan", "e-fail-worse", "b-fail", "a-pass-low", "c-pass"]
    table = format_table(worst_first(comparisons)).splitlines()
    assert [line.split()[0] for line in table[2:]] == ordered
    assert worst_case_line(comparisons).startswith("worst case: d-fail-nan FAIL, min cos n/a")
    assert worst_case_line(comparisons[:3]) == ("worst case: b-fail FAIL, min cos 0.950000, mean cos 0.950000, max abs "
                                                "diff 5.000e-01 (float32 figures)")
    assert worst_case_line([]) == ""
