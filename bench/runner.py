"""Options and the order of sections: `python -m bench [SECTION ...] [options]`.

Sections: forward, early-exit, cross-parity, attention, rope, variants, overhead, suite, scale, suite-scale,
suite-plan, sharp-parity, decode. Without section names: every section but scale, suite-scale, suite-plan and decode. `--small` uses the tiny config and inputs (CPU,
seconds). Figures are printed and, with --json, written to a file; progress and warnings go to stderr.
Interrupted (Ctrl-C or SIGTERM), the bench ends the suite processes it started and removes its temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitparity.loading import DTYPES
from vitparity.models import OneVisionEncoderConfig

from .common import Progress, Terminated, flop_floor, interruptible, log, machine_info, note, sync
from .sections import decode, early_exit, forward, kernels, overhead, suite_plan, suite_run, suite_scale
from .workloads import CASES, CONFIGS, REAL_CASES, SMALL_CASES, SUITE_FILES, build_models

SECTIONS = ("forward", "early-exit", "cross-parity", "attention", "rope", "variants", "overhead", "suite", "scale",
            "suite-scale", "suite-plan", "sharp-parity", "decode")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in ("scale", "suite-scale", "suite-plan", "decode"))
NEEDS_MODELS = {"forward", "early-exit", "cross-parity", "variants", "overhead", "suite", "scale"}
# Sections whose figures stand for the GPU (CUDA, bfloat16) at real sizes: run at those sizes on the CPU they
# measure CPU float32 (or the given dtype) instead and take minutes per ViT-L forward. early-exit (its memory
# figures are measured on the CPU on purpose), rope (a check), suite-scale and decode (CPU by design) are not.
GPU_SIZED = ("forward", "cross-parity", "attention", "variants", "overhead", "suite", "scale", "sharp-parity")


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", metavar="SECTION", help=", ".join(SECTIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--config", default="vit-l", choices=[c for c in CONFIGS if c != "small"])
    p.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny config and inputs (a CPU smoke test)")
    p.add_argument("--init", default="hf", choices=["hf", "sharp"],
                   help="hf: the models' initializer (normal, std 0.02); sharp: fan-in scale, q/k x2.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor-tflops", type=positive, default=None, metavar="RATE",
                   help="matrix rate of the FLOP floor; default: the bf16 rate of a known GPU (H100 80GB HBM3, "
                        "H200), elsewhere no floor")
    p.add_argument("--variants", nargs="*", default=None,
                   help="whole-forward variants: hf:<sdpa kernel or attn_implementation>, "
                        "packing:<backend>[:<sdpa kernel>], rope:<torch|triton>")
    p.add_argument("--variant-cases", nargs="*", default=None, choices=sorted(CASES))
    p.add_argument("--packed-setup", nargs="*", default=None, choices=sorted(CASES),
                   help="cases packed together in the attention section")
    p.add_argument("--scale-videos", type=int, default=100, help="8-frame videos in the scale section")
    p.add_argument("--suite-scale-counts", type=int, nargs="+", default=None,
                   help="extra videos per serial run of the suite-scale section (default 8 48; --small 2 4)")
    p.add_argument("--suite-scale-size", default=None, metavar="HxW",
                   help="size of the suite-scale videos (default 180x320; --small 42x56)")
    p.add_argument("--suite-scale-frames", type=int, default=16, help="frames written per suite-scale video")
    p.add_argument("--suite-scale-workers", type=int, nargs="*", default=None,
                   help="xdist worker counts run at the largest count (default 2 4; --small 2)")
    p.add_argument("--suite-scale-pack-tokens", type=int, default=None,
                   help="--pack-tokens of the runs under xdist (and their serial reference); default the suite's")
    p.add_argument("--suite-scale-args", default="", metavar="ARGS",
                   help="suite options added to every suite-scale run, e.g. '--determinism=sample --companions=sample'")
    p.add_argument("--suite-timeout", type=float, default=900, help="seconds per suite process")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoints and media (default: a temp dir)")
    return p


def parse(argv=None) -> argparse.Namespace:
    p = parser()
    opts = p.parse_args(argv)
    unknown = [s for s in opts.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    opts.sections = tuple(opts.sections) or DEFAULT_SECTIONS
    opts.dtype_name = opts.dtype or ("bfloat16" if opts.device.startswith("cuda") else "float32")
    opts.dtype, opts.device = DTYPES[opts.dtype_name], torch.device(opts.device)
    cuda = opts.device.type == "cuda"
    name = torch.cuda.get_device_name(opts.device) if cuda and torch.cuda.is_available() else opts.device.type
    opts.floor_tflops, opts.floor_note = flop_floor(name, opts.dtype_name, opts.floor_tflops)
    if opts.small:
        opts.config, opts.cases = "small", opts.cases or SMALL_CASES
        opts.overhead_video, opts.suite_files = (12, 42, 56), SUITE_FILES["small"]
        opts.scale_video = (42, 56)
    else:
        opts.cases = opts.cases or REAL_CASES
        opts.overhead_video, opts.suite_files = (48, 1080, 1920), SUITE_FILES["real"]
        opts.scale_video = (1080, 1920)
    opts.suite_scale_counts = opts.suite_scale_counts or ([2, 4] if opts.small else [8, 48])
    opts.suite_scale_workers = opts.suite_scale_workers if opts.suite_scale_workers is not None else (
        [2] if opts.small else [2, 4])
    size = opts.suite_scale_size or ("42x56" if opts.small else "180x320")
    try:
        opts.suite_scale_size = tuple(int(v) for v in size.lower().split("x"))
    except ValueError:
        p.error(f"--suite-scale-size={size}: expected HxW, e.g. 180x320")
    if len(opts.suite_scale_size) != 2 or min(opts.suite_scale_size) < 14:
        p.error(f"--suite-scale-size={size}: expected HxW of at least 14x14")
    if min(opts.suite_scale_counts) < 1:
        p.error("--suite-scale-counts: each count must be >= 1")
    opts.variant_cases = opts.variant_cases or opts.cases[:2]
    if opts.packed_setup is None:
        opts.packed_setup = SMALL_CASES if opts.small else ["image-1080p", "image-1080p", "video-1080p", "video-1080p"]
    if opts.variants is None:
        opts.variants = (["hf:default", "hf:flash", "hf:cudnn", "hf:fa4", "hf:flex_attention", "hf:flash_attention_4",
                          "packing:sdpa:cudnn", "packing:varlen", "packing:flex", "packing:flash_attn_4",
                          "rope:torch", "rope:triton"]
                         if cuda else ["hf:default", "hf:eager", "hf:flex_attention", "packing:sdpa:default",
                                       "packing:flex", "rope:torch"])
    return opts


def cpu_warning(opts: argparse.Namespace) -> str | None:
    """The warning for GPU-sized sections asked for off CUDA without --small (None when there are none)."""
    sections = [s for s in opts.sections if s in GPU_SIZED]
    if opts.device.type == "cuda" or opts.small or not sections:
        return None
    return (f"warning: {', '.join(sections)}: GPU measurements at real sizes (docs/benchmarks.md: CUDA, bfloat16) "
            f"run here on {opts.device} in {opts.dtype_name}, config {opts.config}; their figures are "
            f"{opts.device} figures, and a 1080p case takes minutes. Pass --small for a quick run on the CPU, or "
            f"--device cuda on a GPU.")


def run(opts: argparse.Namespace, workdir: Path) -> dict:
    """Every requested section in order; the results dict holds all figures."""
    results = {"machine": machine_info(opts.device), "sections": list(opts.sections),
               "floor": {"tflops": opts.floor_tflops, "source": opts.floor_note}, "forward": [],
               "cross_parity": [], "attention": [], "attention_check": {}, "variants": [], "sharp_parity": [],
               "suite_run": {}, "seconds_per_section": {}}
    m = results["machine"]
    log(f"device {m['device']}  torch {m['torch']}  transformers {m['transformers']}  python {m['python']}  "
        f"cuda {m.get('cuda')}  cudnn {m.get('cudnn')}  commit {m['commit']}  date {m['date_utc']} UTC\n"
        f"packed backends here {m['packed_backends']}; SDPA kernels {m['sdpa_kernels']}; RoPE {m['rope']}\n"
        f"{opts.floor_note}")
    warning = cpu_warning(opts)
    if warning:
        note(warning)
    hf = packing = None
    if NEEDS_MODELS & set(opts.sections):
        t0 = time.perf_counter()
        with Progress("models", 1) as progress:
            progress.step(f"building both models, config {opts.config}, {opts.dtype_name} on {opts.device}")
            hf, packing = build_models(opts.config, opts.device, opts.dtype, opts.seed, opts.init)
            sync(opts.device)
        c = hf.config
        log(f"config {opts.config}: hidden {c.hidden_size}, layers {c.num_hidden_layers}, heads "
            f"{c.num_attention_heads} (head_dim {c.head_dim}), intermediate {c.intermediate_size}, patch "
            f"{c.patch_size}; {sum(p.numel() for p in hf.parameters()) / 1e6:.1f} M parameters; {opts.dtype_name} "
            f"on {opts.device}; built in {time.perf_counter() - t0:.1f} s")
    config = hf.config if hf is not None else OneVisionEncoderConfig(**CONFIGS[opts.config], rope_temporal_size=64)
    height, width = opts.scale_video
    steps = {
        "forward": lambda: forward.run_forward(opts, hf, packing, results),
        "early-exit": lambda: early_exit.run_early_exit(opts, hf, packing, results),
        "cross-parity": lambda: forward.run_cross_parity(opts, hf, packing, results),
        "attention": lambda: kernels.run_attention(opts, config, results),
        "rope": lambda: kernels.run_rope_check(opts, config, results),
        "variants": lambda: kernels.run_variants(opts, hf, packing, results),
        "overhead": lambda: overhead.run_overhead(opts, hf, packing, workdir, results),
        "suite": lambda: suite_run.run_suite(opts, hf, packing, workdir, results, label="four-files",
                                             files=opts.suite_files, select="benchfile_", runs=("cold", "warm")),
        "scale": lambda: suite_run.run_suite(
            opts, hf, packing, workdir, results, label=f"scale-{opts.scale_videos}",
            files=[(f"scalevid_{i:03d}.mp4", 8, height, width) for i in range(opts.scale_videos)],
            select="scalevid_ and test_parity", runs=("warm",)),
        "suite-scale": lambda: suite_scale.run_suite_scale(opts, workdir, results),
        "suite-plan": lambda: suite_plan.run_suite_plan(opts, workdir, results),
        "sharp-parity": lambda: forward.run_sharp_parity(opts, results),
        "decode": lambda: decode.run_decode(opts, workdir / "decode", results),
    }
    for index, name in enumerate(opts.sections, 1):
        note(f"section {index}/{len(opts.sections)}: {name}")
        t0 = time.perf_counter()
        if name in ("suite", "scale", "suite-scale", "suite-plan", "decode"):
            steps[name]()
        else:
            with torch.inference_mode():
                steps[name]()
        results["seconds_per_section"][name] = time.perf_counter() - t0
        if opts.json:  # after every section, so a run cut short keeps what it measured
            write_json(opts.json, results)
    return results


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA requested but not available; use --device cpu (and --small)")
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="vitparity-bench-") as tmp, interruptible():
            workdir = opts.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            run(opts, workdir)
    except KeyboardInterrupt:
        note("interrupted: child processes ended, temporary folder removed")
        return 130
    except Terminated:
        note("terminated (SIGTERM): child processes ended, temporary folder removed")
        raise
    if opts.json:
        log(f"\nwrote {opts.json}")
    return 0
