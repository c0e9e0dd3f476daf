"""Every GPU measurement of docs/benchmarks.md in one run, results written to a folder:

    python -m bench gpu-check --out gpu-results            # H100 / H200: about 8 minutes (see the docs)
    python -m bench gpu-check --out /tmp/check --small     # tiny sizes, on the CPU (tests/test_bench.py)

Sections, in order (each one's figures are in results.json as soon as it ends, so a run cut short keeps them):
forward (the four reference cases, each model, x FLOP floor, peak memory, syncs, parity), attention (every
kernel available here against float64, then timed dense and packed at head_dim 64 on the four cases and the
four-sample pack), rope, variants (whole forwards on the faster-kernel candidates), cross-parity (the models
on different kernels), suite (pytest from the shell on two 1080p images and two 8-frame 1080p videos with ViT-L
checkpoints written here, cold and warm), scale (N 8-frame 1080p videos through the suite: peak memory,
forwards per second) and sharp-parity.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import runner
from .common import interruptible, log

CUDA_VARIANTS = ["hf:cudnn", "hf:fa4", "hf:flex_attention", "hf:flash_attention_4", "packing:sdpa:cudnn",
                 "packing:varlen", "packing:flex", "packing:flash_attn_4", "rope:torch", "rope:triton"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, checkpoints and media")
    p.add_argument("--small", action="store_true", help="tiny config and inputs (runs on the CPU)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--scale-videos", type=int, default=None, help="default 30 (3 with --small); 100 is the target")
    args = p.parse_args(argv)
    sections = ["forward", "attention", "rope", "variants", "cross-parity", "suite", "scale", "sharp-parity"]
    argv = [*sections, "--repeats", "3", "--warmup", "1", "--json", str(args.out / "results.json"),
            "--workdir", str(args.out / "work"),
            "--scale-videos", str(args.scale_videos or (3 if args.small else 30))]
    if args.small:
        argv.append("--small")
    if args.device:
        argv += ["--device", args.device]
    opts = runner.parse(argv)
    if opts.device.type == "cuda":
        opts.variants = CUDA_VARIANTS
        opts.variant_cases = ["image-1080p", "video-480p"]
    args.out.mkdir(parents=True, exist_ok=True)
    with interruptible():  # Ctrl-C or SIGTERM: the suite processes it started end with it
        results = runner.run(opts, opts.workdir)
    log("\nseconds per section: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds_per_section"].items()))
    log(f"wrote {opts.json}")
    return 0
