"""What the suite adds around the forwards for one video file, each step timed on its own: decode, hash,
normalise, patchify / positions, the protocol outside the model forwards, comparison and golden reduction."""

from __future__ import annotations

from pathlib import Path

import torch

from vitparity.compare import compare_features
from vitparity.extract import patchify, prepare_sample, token_positions
from vitparity.media import load_media
from vitparity.snapshots import file_sha256, reduce_features

from ..common import ForwardClock, Progress, Timer, print_table, sync
from ..workloads import forward_fns, write_media


def run_overhead(opts, hf, packing, workdir: Path, results: dict) -> None:
    """Median of 3 per step (host clock around a synchronised step, so device work is included)."""
    device, config = opts.device, hf.config
    host = Timer(torch.device("cpu"))
    frames, height, width = opts.overhead_video
    (path,) = write_media(workdir, [("overhead.mp4", frames, height, width)], seed=50, label="overhead")
    steps: dict[str, float] = {}
    progress = Progress("overhead", 8)

    def timed(name: str, fn):
        progress.step(f"{name}: 3 runs")

        def step():
            out = fn()
            sync(device)
            return out

        sync(device)
        steps[name], _, out = host.measure(step, 0, 3)
        return out

    with progress:
        media = timed("decode (load_media, 8 frames)",
                      lambda: load_media(path, num_frames=8, patch_size=config.patch_size))
        timed("sha256 of the file", lambda: file_sha256(path))
        sample = timed("normalise + host-to-device (prepare_sample)", lambda: prepare_sample(
            media, patch_size=config.patch_size, dtype=opts.dtype, device=device,
            temporal_context=config.rope_temporal_size))
        timed("patchify + positions (packing side)",
              lambda: (patchify(sample.pixels, config.patch_size), token_positions(sample)))
        features = {}
        for side, fn in forward_fns(hf, packing, sample).items():
            progress.step(f"{side}: one extraction, its model forward timed apart (after a warm-up)")
            fn()  # warm
            clock = ForwardClock(hf if side == "hf" else packing, Timer(device))
            sync(device)
            whole, _, features[side] = host.measure(lambda fn=fn: (fn(), sync(device))[0], 0, 1)
            steps[f"{side}: extraction outside the model forward"] = max(whole - clock.total(), 0.0)
            clock.remove()
        a, b = features["hf"], features["packing"]
        timed("compare_features (on the device)", lambda: compare_features(a, b, name="overhead"))
        timed("golden reduction of both sides (on the device)", lambda: (reduce_features(a), reduce_features(b)))
    results["overhead"] = {"tokens": sample.num_tokens, "file": path.name, "steps_s": steps,
                           "total_s": sum(steps.values())}
    print_table(f"Suite overhead for one {width}x{height} {frames}-frame video, 8 frames sampled "
                f"({sample.num_tokens} tokens), median of 3",
                ["step", "seconds"], [[k, f"{v:.4f}"] for k, v in steps.items()]
                + [["total", f"{sum(steps.values()):.4f}"]])
