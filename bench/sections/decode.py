"""Video decode time of the suite's media loader: seeking to every sampled frame vs the default, which decodes
through gaps of up to `vitparity.media.FORWARD_DECODE_LIMIT` frames and seeks over longer ones. Then the
normalisation of a 64-frame context (`vitparity.extract.normalize`, one torch thread) against the elementwise
formula (a 256-entry table gathered for the whole clip, then mean and std): times, and the same values (bit for bit).

Clips are written with OpenCV (mp4v, 24 fps, the bench's synthetic frames); 8 frames are sampled from each with
the release formula. Prints the median wall time of `load_media` per clip and mode, and checks that both modes
return the same pixels (a difference is an error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitparity import media
from vitparity.extract import CLIP_NORMALIZATION, normalize

from ..common import Progress, Timer, print_table
from ..workloads import write_media

CLIPS = [("clip-48f-1080p.mp4", 48, 1080, 1920), ("clip-240f-1080p.mp4", 240, 1080, 1920),
         ("clip-1200f-480p.mp4", 1200, 480, 854)]
SMALL_CLIPS = [("clip-48f-small.mp4", 48, 64, 96), ("clip-240f-small.mp4", 240, 64, 96)]
MODES = {"seek-only": 0, "default": None}  # FORWARD_DECODE_LIMIT: 0 seeks to every sampled frame


def time_load(path: Path, forward_limit: int | None, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of load_media over `repeats` calls with the given forward-decode limit, and its frames."""
    default = media.FORWARD_DECODE_LIMIT
    media.FORWARD_DECODE_LIMIT = default if forward_limit is None else forward_limit
    try:
        median, _, loaded = Timer(torch.device("cpu")).measure(
            lambda: media.load_media(path, num_frames=8, patch_size=14), 0, repeats)
    finally:
        media.FORWARD_DECODE_LIMIT = default
    return median, loaded.frames


def run_decode(opts, workdir: Path, results: dict) -> None:
    clips = SMALL_CLIPS if opts.small else CLIPS
    write_media(workdir, clips, label="decode")
    rows, entries = [], []
    with Progress("decode", len(clips) * len(MODES)) as progress:
        for name, t, height, width in clips:
            timed = {}
            for mode, limit in MODES.items():
                progress.step(f"{name}: {mode}, 8 frames loaded x {opts.repeats}")
                timed[mode] = time_load(workdir / name, limit, opts.repeats)
            same = all(np.array_equal(timed["seek-only"][1], frames) for _, frames in timed.values())
            entries.append({"clip": name, "frames": t, "size": f"{width}x{height}", "same_pixels": same,
                            **{f"{mode}_s": seconds for mode, (seconds, _) in timed.items()}})
            rows.append([name, str(t), f"{width}x{height}", *(f"{s:.3f}" for s, _ in timed.values()),
                         "yes" if same else "NO"])
    results["decode"] = entries
    print_table(f"Decode of 8 sampled frames, median of {opts.repeats}; default = decode through gaps of up to "
                f"{media.FORWARD_DECODE_LIMIT} frames", ["clip", "frames", "size", "seek-only s", "default s",
                                                         "same pixels"], rows)
    if not all(e["same_pixels"] for e in entries):
        raise RuntimeError("decode modes returned different pixels: " + ", ".join(
            e["clip"] for e in entries if not e["same_pixels"]))
    run_normalize(opts, results)


NORMALIZE_SIZES = [(64, 224, 224), (64, 480, 854)]
SMALL_NORMALIZE_SIZES = [(64, 64, 96)]


def elementwise_normalize(frames: np.ndarray) -> torch.Tensor:
    """The formula applied pixel by pixel: table gather for the whole clip, then (x - mean) / std in float32."""
    x = torch.from_numpy(frames)
    table = (torch.arange(256, dtype=torch.float64) * CLIP_NORMALIZATION.rescale).to(torch.float32)
    x = table[x.permute(3, 0, 1, 2).int()]
    mean = torch.tensor(CLIP_NORMALIZATION.mean).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_NORMALIZATION.std).view(3, 1, 1, 1)
    return (x - mean) / std


def run_normalize(opts, results: dict) -> None:
    rows, entries = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t, height, width in SMALL_NORMALIZE_SIZES if opts.small else NORMALIZE_SIZES:
            frames = np.random.default_rng(0).integers(0, 256, (t, height, width, 3), dtype=np.uint8)
            timer = Timer(torch.device("cpu"))
            ours, _, got = timer.measure(lambda: normalize(frames, dtype=torch.float32, device="cpu"), 0, opts.repeats)
            formula, _, expected = timer.measure(lambda: elementwise_normalize(frames), 0, opts.repeats)
            same = torch.equal(got, expected)
            entries.append({"frames": t, "size": f"{width}x{height}", "normalize_s": ours, "elementwise_s": formula,
                            "same_values": same})
            rows.append([str(t), f"{width}x{height}", f"{ours:.3f}", f"{formula:.3f}", "yes" if same else "NO"])
    finally:
        torch.set_num_threads(threads)
    results["normalize"] = entries
    print_table(f"Normalisation of a context, float32, CPU, 1 thread, median of {opts.repeats}",
                ["frames", "size", "normalize s", "elementwise s", "same values"], rows)
    if not all(e["same_values"] for e in entries):
        raise RuntimeError("normalize differs from the elementwise formula")
