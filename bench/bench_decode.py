#!/usr/bin/env python
"""Video decode time of the suite's media loader: seeking to every sampled frame vs the default, which
decodes through gaps of up to `vitparity.media.FORWARD_DECODE_LIMIT` frames and seeks over longer ones.

    python bench/bench_decode.py [--repeats 5] [--workdir DIR]
    python bench/bench_decode.py --small      # small clips, seconds (tests/test_bench.py runs it)

Clips are written with OpenCV (mp4v, 24 fps, the synthetic frames of bench_forward.py); 8 frames are sampled
from each with the release formula. Prints the median wall time of `load_media` per clip and mode, and
checks that both modes return the same pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import write_media  # noqa: E402

from vitparity import media  # noqa: E402

CLIPS = [("clip-48f-1080p.mp4", 48, 1080, 1920), ("clip-240f-1080p.mp4", 240, 1080, 1920),
         ("clip-1200f-480p.mp4", 1200, 480, 854)]
SMALL_CLIPS = [("clip-48f-small.mp4", 48, 64, 96), ("clip-240f-small.mp4", 240, 64, 96)]
MODES = {"seek-only": 0, "default": None}  # FORWARD_DECODE_LIMIT: 0 seeks to every sampled frame


def time_load(path: Path, forward_limit: int | None, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of load_media over `repeats` calls, and the frames it returned."""
    default = media.FORWARD_DECODE_LIMIT
    media.FORWARD_DECODE_LIMIT = default if forward_limit is None else forward_limit
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            loaded = media.load_media(path, num_frames=8, patch_size=14)
            times.append(time.perf_counter() - start)
    finally:
        media.FORWARD_DECODE_LIMIT = default
    return statistics.median(times), loaded.frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="where the clips are written (default: a temp dir)")
    parser.add_argument("--small", action="store_true", help="small clips (smoke test)")
    args = parser.parse_args()
    if args.workdir is None:
        with tempfile.TemporaryDirectory() as folder:
            return run(args, Path(folder))
    args.workdir.mkdir(parents=True, exist_ok=True)
    return run(args, args.workdir)


def run(args: argparse.Namespace, workdir: Path) -> int:
    """Write the clips missing from `workdir`, time both modes on each and print the table; 1 if pixels differ."""
    clips = SMALL_CLIPS if args.small else CLIPS
    write_media(workdir, [spec for spec in clips if not (workdir / spec[0]).exists()])
    print(f"decode of 8 sampled frames, median of {args.repeats}; default = decode through gaps of up to "
          f"{media.FORWARD_DECODE_LIMIT} frames")
    print(f"{'clip':<22} {'frames':>6} {'size':>10}  " + "  ".join(f"{mode + ' s':>12}" for mode in MODES) + "  same pixels")
    for name, t, height, width in clips:
        results = [time_load(workdir / name, limit, args.repeats) for limit in MODES.values()]
        same = all(np.array_equal(results[0][1], frames) for _, frames in results[1:])
        cells = "  ".join(f"{seconds:>12.3f}" for seconds, _ in results)
        print(f"{name:<22} {t:>6} {f'{width}x{height}':>10}  {cells}  {'yes' if same else 'NO'}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
