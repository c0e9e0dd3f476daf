"""Human-readable output of feature comparisons: text report, table, cosine heatmap."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from vitparity.compare import Comparison
from vitparity.precision import margin

# Heatmap layout, in pixels.
HEATMAP_MARGIN = 8
HEATMAP_GAP = 4
HEATMAP_HEADER = 44
HEATMAP_LEGEND = 36
HEATMAP_MIN_WIDTH = 320
HEATMAP_MAX_COLUMNS = 8
# Heatmap colour scale: 1 - cos on a log10 scale from 1e-6 (best) to 1 (worst).
HEATMAP_LOG_RANGE = (-6.0, 0.0)
HEATMAP_NAN_BGR = (255, 0, 255)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_BGR = (255, 255, 255)
_BACKGROUND_BGR = (40, 40, 40)


def _num(value: float, spec: str) -> str:
    """Format ``value`` with ``spec``, or ``n/a`` when it is not finite."""
    return format(value, spec) if math.isfinite(value) else "n/a"


def _cos_above(value: float, threshold: float) -> str:
    """Format a cosine with 6+ decimals, enough to show it differs from ``threshold``."""
    for decimals in range(6, 10):
        text = f"{value:.{decimals}f}"
        if float(text) != threshold:
            return text
    return repr(value)


def _shape(shape: tuple[int, ...]) -> str:
    """Format a shape as ``(a, b)``."""
    return "(" + ", ".join(str(d) for d in shape) + ")"


def precision_line(c: Comparison) -> str:
    """The figures the precision bars judge, each with its bar and margin: `float32 bars: mean 1-cos 1.822e-06
    (0.456 of the bar 4e-06); norm gap 2.206e-04 (0.221 of the bar 0.001)`; `no precision bars` without them."""
    if c.bars is None:
        return f"no precision bars: mean 1-cos {_num(c.cos_gap, '.3e')}, norm gap {_num(c.norm_gap, '.3e')}"

    def part(label: str, value: float, limit: float | None) -> str:
        bar = f" of the bar {limit:g}" if limit is not None else ""
        return f"{label} {_num(value, '.3e')} ({margin(value, limit).removesuffix(' of the bar')}{bar})"

    return (f"{c.bars.dtype} bars: {part('mean 1-cos', c.cos_gap, c.bars.cos_gap)}; "
            f"{part('norm gap', c.norm_gap, c.bars.norm_gap)}")


def _verdict(c: Comparison) -> str:
    """``PASS (...)`` or ``FAIL: reason``."""
    if c.passed:
        return f"PASS (min cosine {_cos_above(c.min_cos, c.threshold)} > {c.threshold})"
    return f"FAIL: {c.reason}"


def format_report(comparisons: Sequence[Comparison], *, title: str = "") -> str:
    """Multi-line report: one block per comparison, then a pass/fail summary."""
    lines = [title, "=" * len(title), ""] if title else []
    for index, c in enumerate(comparisons, start=1):
        label_a, label_b = c.labels
        lines += [
            f"[{index}] {c.name or '<unnamed>'}",
            f"  shapes: {label_a} {_shape(c.shape_a)}  {label_b} {_shape(c.shape_b)}",
            f"  max abs diff: {_num(c.max_abs, '.3e')}   mean abs diff: {_num(c.mean_abs, '.3e')}",
            f"  cosine per token: min {_num(c.min_cos, '.6f')}  mean {_num(c.mean_cos, '.6f')}"
            f"  max {_num(c.max_cos, '.6f')}",
            f"  {precision_line(c)}",
            f"  {_verdict(c)}",
            "",
        ]
    passed = sum(c.passed for c in comparisons)
    lines.append(
        f"Summary: {len(comparisons)} inputs, {passed} passed, {len(comparisons) - passed} failed"
    )
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` characters, marking the cut with ``...``."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _tokens(c: Comparison) -> str:
    """Token counts as ``N`` or ``Na/Nb`` when they differ (``?`` if unknown)."""
    counts = [str(s[-2]) if len(s) >= 2 else "?" for s in (c.shape_a, c.shape_b)]
    return counts[0] if counts[0] == counts[1] else "/".join(counts)


TABLE_HEADER = ("case", "tokens", "max abs", "mean abs", "min cos", "mean cos", "mean 1-cos (of bar)",
                "norm gap (of bar)", "verdict")


def _against_bar(value: float, limit: float | None, on: bool) -> str:
    """`1.822e-06 (0.456)`: a figure and the fraction of its bar it uses; `(off)` when the bar is off."""
    if not on:
        return _num(value, ".3e")
    fraction = margin(value, limit).removesuffix(" of the bar")
    return f"{_num(value, '.3e')} ({fraction})"


def table_cells(c: Comparison, *, case_width: int = 32, verdict_width: int = 60) -> tuple[str, ...]:
    """The cells of one comparison's row in the summary tables (columns of TABLE_HEADER)."""
    return (
        _shorten(c.name or "<unnamed>", case_width),
        _tokens(c),
        _num(c.max_abs, ".3e"),
        _num(c.mean_abs, ".3e"),
        _num(c.min_cos, ".6f"),
        _num(c.mean_cos, ".6f"),
        _against_bar(c.cos_gap, c.bars.cos_gap if c.bars else None, c.bars is not None),
        _against_bar(c.norm_gap, c.bars.norm_gap if c.bars else None, c.bars is not None),
        _shorten("PASS" if c.passed else f"FAIL: {c.reason}", verdict_width),
    )


def _badness(c: Comparison) -> tuple[bool, float, str]:
    """Sort key, worst first: failures before passes, then the lowest min cosine (NaN counts as the lowest)."""
    return c.passed, c.min_cos if math.isfinite(c.min_cos) else -math.inf, c.name or ""


def worst_first(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons, failures first, each part by ascending min cosine (then by name)."""
    return sorted(comparisons, key=_badness)


def worst_case_line(comparisons: Sequence[Comparison]) -> str:
    """`worst case: <name> FAIL|PASS, min cos ..., max abs diff ...` of the comparison sorted first by
    `worst_first` ("" for none). The figures are float32 comparisons."""
    if not comparisons:
        return ""
    c = worst_first(comparisons)[0]
    return (f"worst case: {c.name or '<unnamed>'} {'PASS' if c.passed else 'FAIL'}, min cos {_num(c.min_cos, '.6f')}, "
            f"mean cos {_num(c.mean_cos, '.6f')}, max abs diff {_num(c.max_abs, '.3e')} (float32 figures)")


def format_table(comparisons: Sequence[Comparison], *, case_width: int = 32,
                 verdict_width: int = 60) -> str:
    """Compact fixed-width table, one row per comparison."""
    header = TABLE_HEADER
    rows = [table_cells(c, case_width=case_width, verdict_width=verdict_width) for c in comparisons]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    numeric = {1, 2, 3, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def cosine_to_level(token_cos: np.ndarray) -> np.ndarray:
    """Map cosines to uint8 colour-map levels: 0 for cos >= 1 - 1e-6, 255 for cos <= 0.

    The level is linear in log10(1 - cos) over ``HEATMAP_LOG_RANGE``, so
    0.9999 maps to 85 and 0.99 to 170.  NaN maps to 255.
    """
    low, high = HEATMAP_LOG_RANGE
    with np.errstate(invalid="ignore"):
        err = np.clip(1.0 - np.asarray(token_cos, dtype=np.float64), 10.0**low, 10.0**high)
    frac = (np.log10(err) - low) / (high - low)
    return np.round(np.nan_to_num(frac, nan=1.0) * 255).astype(np.uint8)


def _colourise(levels: np.ndarray) -> np.ndarray:
    """Apply the heatmap colour map to a 2-D uint8 array (BGR output)."""
    return cv2.applyColorMap(levels, cv2.COLORMAP_TURBO)


def _fit_text(text: str, max_px: int, scale: float) -> str:
    """Shorten ``text`` until it renders within ``max_px`` pixels."""
    while text and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > max_px:
        text = text[:-4] + "..." if len(text) > 4 else ""
    return text


def _layout(grid_thw: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Heatmap layout for ``grid_thw``: (cell px, frame columns, width, height).

    Each token is a square of 2..16 px, chosen so the token grid stays within
    about 1024 x 512 px.
    """
    t, h, w = grid_thw
    cols = min(t, HEATMAP_MAX_COLUMNS)
    rows = math.ceil(t / cols)
    cell = max(2, min(16, 1024 // (cols * w), 512 // (rows * h)))
    grid_w = cols * w * cell + (cols - 1) * HEATMAP_GAP
    grid_h = rows * h * cell + (rows - 1) * HEATMAP_GAP
    width = max(grid_w + 2 * HEATMAP_MARGIN, HEATMAP_MIN_WIDTH)
    height = HEATMAP_HEADER + grid_h + HEATMAP_MARGIN + HEATMAP_LEGEND
    return cell, cols, width, height


def _draw_legend(canvas: np.ndarray, top: int) -> None:
    """Draw the colour bar with cosine tick labels below ``top``."""
    left, right = HEATMAP_MARGIN, canvas.shape[1] - HEATMAP_MARGIN
    bar_h = 10
    ramp = np.linspace(0, 255, right - left).round().astype(np.uint8)
    canvas[top : top + bar_h, left:right] = _colourise(np.tile(ramp, (bar_h, 1)))
    low, high = HEATMAP_LOG_RANGE
    ticks = (("1.0", -6.0), ("0.9999", -4.0), ("0.99", -2.0), ("<=0", 0.0))
    for label, log_err in ticks:
        x = left + round((log_err - low) / (high - low) * (right - left - 1))
        cv2.line(canvas, (x, top + bar_h), (x, top + bar_h + 3), _TEXT_BGR, 1)
        text_w = cv2.getTextSize(label, _FONT, 0.35, 1)[0][0]
        x_text = min(max(x - text_w // 2, left), right - text_w)
        cv2.putText(canvas, label, (x_text, top + bar_h + 15), _FONT, 0.35, _TEXT_BGR, 1,
                    cv2.LINE_AA)


def _write_png(canvas: np.ndarray, path: str | Path, what: str) -> Path:
    """Encode `canvas` (BGR) as a PNG at `path`, creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", canvas)
    if not ok:
        raise OSError(f"could not encode {what} PNG for {out}")
    out.write_bytes(encoded.tobytes())
    return out


def write_cosine_heatmap(token_cos: np.ndarray, grid_thw: tuple[int, int, int],
                         path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Write a PNG of per-token cosine, one panel per frame; return its path.

    Tokens are frame-major then row-major, i.e. reshaped to (t, h, w).  Frames
    are tiled left to right, at most ``HEATMAP_MAX_COLUMNS`` per row, each token
    drawn as a square block.  Colours follow ``cosine_to_level`` through the
    TURBO colour map (blue: cos >= 1 - 1e-6, red: cos <= 0, 0.99 at two
    thirds); NaN tokens are magenta.  The header shows the title and min cosine.
    """
    cos = np.asarray(token_cos, dtype=np.float64)
    t, h, w = (int(v) for v in grid_thw)
    if min(t, h, w) < 1:
        raise ValueError(f"grid_thw must be positive, got {tuple(grid_thw)}")
    if cos.ndim != 1 or cos.size != t * h * w:
        raise ValueError(
            f"token_cos has shape {cos.shape}, expected ({t * h * w},) for grid {(t, h, w)}"
        )

    cell, cols, width, height = _layout((t, h, w))
    canvas = np.full((height, width, 3), _BACKGROUND_BGR, dtype=np.uint8)
    frames = _colourise(cosine_to_level(cos).reshape(t * h, w)).reshape(t, h, w, 3)
    frames[np.isnan(cos).reshape(t, h, w)] = HEATMAP_NAN_BGR
    for frame_index, frame in enumerate(frames):
        row, col = divmod(frame_index, cols)
        y = HEATMAP_HEADER + row * (h * cell + HEATMAP_GAP)
        x = HEATMAP_MARGIN + col * (w * cell + HEATMAP_GAP)
        canvas[y : y + h * cell, x : x + w * cell] = np.repeat(np.repeat(frame, cell, 0), cell, 1)

    finite = cos[np.isfinite(cos)]
    min_text = f"{finite.min():.6f}" if finite.size else "n/a"
    info = f"min cos {min_text}  grid t={t} h={h} w={w}"
    if np.isnan(cos).any():
        info += "  (magenta: NaN)"
    text_px = width - 2 * HEATMAP_MARGIN
    for line_index, text in enumerate((title, info)):
        origin = (HEATMAP_MARGIN, 17 + 18 * line_index)
        cv2.putText(canvas, _fit_text(text, text_px, 0.45), origin, _FONT, 0.45, _TEXT_BGR, 1,
                    cv2.LINE_AA)
    _draw_legend(canvas, height - HEATMAP_LEGEND)

    return _write_png(canvas, path, "heatmap")


# Layer-trace plot layout, in pixels.
TRACE_PLOT_SIZE = (640, 360)  # width, height
TRACE_PLOT_MARGINS = (70, 16, 32, 40)  # left, right, top, bottom
TRACE_LEGEND_LINE = 16
# Distinct BGR line colours, cycled over the cases.
TRACE_COLOURS_BGR = (
    (255, 160, 60), (60, 200, 255), (90, 220, 90), (220, 100, 255), (80, 80, 255), (255, 255, 120),
)


def cosine_to_height(cos: float) -> float:
    """Plot height of a cosine in [0, 1]: 0 at cos <= 0, 1 at cos >= 1 - 1e-6, linear in log10(1 - cos)."""
    low, high = HEATMAP_LOG_RANGE
    err = min(max(1.0 - cos, 10.0**low), 10.0**high)
    return (high - math.log10(err)) / (high - low)


def write_layer_trace_plot(traces: Sequence, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Write a PNG of min cosine per hidden state, one line per trace (vitparity.trace.LayerTrace); return its path.

    x: hidden_states index (0 = embedding output); y: min per-token cosine on the heat map's scale (log10 of
    1 - cos, from 1.0 at the top to <= 0 at the bottom). The threshold is a grey line, the first divergence of
    each case a filled dot, NaN rows a gap in the line.
    """
    if not traces:
        raise ValueError("no traces to plot")
    width, plot_height = TRACE_PLOT_SIZE
    height = plot_height + TRACE_LEGEND_LINE * len(traces)  # one legend line per case below the axes
    left, right, top, bottom = TRACE_PLOT_MARGINS
    x0, x1, y0, y1 = left, width - right, top, plot_height - bottom
    count = max(len(trace.rows) for trace in traces)
    canvas = np.full((height, width, 3), _BACKGROUND_BGR, dtype=np.uint8)

    def x_of(index: int) -> int:
        return x0 + round(index * (x1 - x0) / max(count - 1, 1))

    def y_of(cos: float) -> int:
        return y1 - round(cosine_to_height(cos) * (y1 - y0))

    grey = (120, 120, 120)
    cv2.rectangle(canvas, (x0, y0), (x1, y1), grey, 1)
    for label, cos in (("1.0", 1.0), ("0.9999", 0.9999), ("0.99", 0.99), ("<=0", 0.0)):
        y = y_of(cos)
        cv2.line(canvas, (x0 - 4, y), (x0, y), _TEXT_BGR, 1)
        text_w = cv2.getTextSize(label, _FONT, 0.4, 1)[0][0]
        cv2.putText(canvas, label, (x0 - 8 - text_w, y + 4), _FONT, 0.4, _TEXT_BGR, 1, cv2.LINE_AA)
    for index in range(count):
        x = x_of(index)
        cv2.line(canvas, (x, y1), (x, y1 + 4), _TEXT_BGR, 1)
        text_w = cv2.getTextSize(str(index), _FONT, 0.4, 1)[0][0]
        cv2.putText(canvas, str(index), (x - text_w // 2, y1 + 18), _FONT, 0.4, _TEXT_BGR, 1, cv2.LINE_AA)
    cv2.putText(canvas, "hidden_states index (0 = embedding output)", (x0, plot_height - 8), _FONT, 0.4, _TEXT_BGR, 1,
                cv2.LINE_AA)
    threshold = traces[0].threshold
    cv2.line(canvas, (x0, y_of(threshold)), (x1, y_of(threshold)), grey, 1)

    for number, trace in enumerate(traces):
        colour = TRACE_COLOURS_BGR[number % len(TRACE_COLOURS_BGR)]
        points = [(x_of(row.index), y_of(row.min_cos)) if math.isfinite(row.min_cos) else None for row in trace.rows]
        for a, b in zip(points, points[1:]):
            if a is not None and b is not None:
                cv2.line(canvas, a, b, colour, 2, cv2.LINE_AA)
        for row, point in zip(trace.rows, points):
            if point is not None:
                cv2.circle(canvas, point, 5 if row.index == trace.first_divergence else 3, colour,
                           -1 if row.index == trace.first_divergence else 1, cv2.LINE_AA)
        y = height - TRACE_LEGEND_LINE * (len(traces) - number) + 4
        cv2.line(canvas, (x0, y - 4), (x0 + 14, y - 4), colour, 2)
        legend = _fit_text(f"{trace.name}: first divergence: {trace.divergence()}", x1 - x0 - 20, 0.4)
        cv2.putText(canvas, legend, (x0 + 20, y), _FONT, 0.4, colour, 1, cv2.LINE_AA)
    header = title or "min cosine per hidden state"
    cv2.putText(canvas, _fit_text(f"{header}  (threshold {threshold})", width - 2 * HEATMAP_MARGIN, 0.45),
                (HEATMAP_MARGIN, 17), _FONT, 0.45, _TEXT_BGR, 1, cv2.LINE_AA)

    return _write_png(canvas, path, "layer-trace")
