"""The whole parity suite on CUDA with ViT-L checkpoints, as the release job runs it, per dtype:

    python -m bench gpu-suite --out gpu-suite                 # H100 / H200: bfloat16 and float32, -n 1
    python -m bench gpu-suite --out /tmp/gs --small           # tiny config and media, on the CPU (about 3.5 min)

For each dtype: both models built with the bench's weights and written as checkpoints, media written (an image and a
video, added to the bundled ones by --media), then two pytest processes over every suite test with `-n 1`:
the first writes goldens into a folder of its own (`--golden-dir=... --snapshot-update`), the second checks every
test against them. Each run's exit status, counts and summary lines are printed and written to
OUT/results.json; each run's full output to OUT/<dtype>-<run>.txt. Exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from .common import interruptible, log, machine_info, print_table, run_child
from .sections.suite_run import REPO, write_checkpoints
from .workloads import build_models, write_media

MEDIA = {
    "real": [("gpusuite_image1.jpg", 1, 720, 1280), ("gpusuite_video1.mp4", 24, 480, 854)],
    "small": [("gpusuite_image1.jpg", 1, 56, 70), ("gpusuite_video1.mp4", 12, 42, 56)],
}
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)")


def run_pytest(args: list[str], out_file: Path, timeout: float) -> dict:
    """One pytest process from the repository root: exit status, wall seconds, the closing counts."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    start = time.perf_counter()
    proc = run_child(command, timeout, cwd=REPO)
    wall = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    out_file.write_text(" ".join(command) + "\n\n" + text)
    closing = [line for line in text.splitlines() if " in " in line and COUNTS.search(line)]
    counts = {kind: int(n) for n, kind in COUNTS.findall(closing[-1])} if closing else {}
    return {"command": command, "exit": proc.returncode, "wall_s": round(wall, 2), "counts": counts,
            "summary": [line for line in text.splitlines() if "comparisons," in line or "forwards:" in line]
            + closing[-1:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu-suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, run outputs, checkpoints, media")
    p.add_argument("--small", action="store_true", help="tiny config and media (runs on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--workers", default="1", help="pytest-xdist -n (default 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest process")
    args = p.parse_args(argv)
    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    size = "small" if args.small else "real"
    config = "small" if args.small else "vit-l"
    device = torch.device(args.device)
    results: dict = {"machine": machine_info(device), "config": config, "media": MEDIA[size], "runs": []}
    media = work / "media"
    rows = []
    with interruptible():
        write_media(media, MEDIA[size], seed=500, label="gpu-suite")
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            hf, packing = build_models(config, device, dtype, seed=0)
            checkpoints = write_checkpoints(hf, packing, work / f"checkpoints-{dtype_name}")
            del hf, packing
            if device.type == "cuda":
                torch.cuda.empty_cache()
            common = [f"-n={args.workers}", f"--hf-model={checkpoints[0]}", f"--packing-model={checkpoints[1]}",
                      f"--media={media}", f"--device={args.device}", f"--dtype={dtype_name}",
                      f"--golden-dir={work / ('golden-' + dtype_name)}", f"--report-dir={work / 'report'}",
                      f"--junitxml={work / ('junit-' + dtype_name + '.xml')}"]
            for run, extra in (("update", ["--snapshot-update"]), ("check", [])):
                log(f"[gpu-suite] {dtype_name} {run}: the whole suite, -n {args.workers}")
                entry = run_pytest([*common, *extra], out / f"{dtype_name}-{run}.txt", args.timeout)
                entry.update(dtype=dtype_name, run=run)
                results["runs"].append(entry)
                (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
                rows.append([dtype_name, run, str(entry["exit"]), f"{entry['wall_s']:.1f}",
                             ", ".join(f"{n} {k}" for k, n in entry["counts"].items())])
                for line in entry["summary"]:
                    log(f"  {line}")
    print_table(f"The whole suite on {results['machine']['device']} ({config}, -n {args.workers})",
                ["dtype", "run", "exit", "wall s", "counts"], rows)
    log(f"wrote {out / 'results.json'}")
    return 0 if all(r["exit"] == 0 for r in results["runs"]) else 1
