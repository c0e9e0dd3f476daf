"""The whole parity suite on CUDA with ViT-L checkpoints, as the release job runs it, per dtype:

    python -m bench gpu-suite --out gpu-suite                 # H100 / H200: bfloat16 and float32, -n 1
    python -m bench gpu-suite --out /tmp/gs --small           # tiny config and media, on the CPU (about 3.5 min)

For each dtype: both models built with the bench's weights and written as checkpoints, media written (an image and a
video, added to the bundled ones by --media), then, for each kind of model code (`--code`), two pytest processes
over every suite test with `-n 1`: the first writes goldens into a folder of its own (`--golden-dir=...
--snapshot-update`), the second checks every test against them. `own`: the checkpoints run vitparity's classes;
`release`: copies of them ship the release-format modeling files of tests/remote/release (`auto_map`) and run with
`--trust-remote-code`, so the checkpoints' own code, vitparity's classes as the reference and, where flash-attn is
not installed, the flash-attn stand-in are what the suite checks. Each run's exit status, counts and summary lines
are printed and written to OUT/results.json; each run's full output to OUT/<dtype>-<code>-<run>.txt. Exit status 1
when any run failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .common import interruptible, log, machine_info, print_table, run_child
from .sections.suite_run import REPO, write_checkpoints, write_folder_once
from .workloads import build_models, write_media

MEDIA = {
    "real": [("gpusuite_image1.jpg", 1, 720, 1280), ("gpusuite_video1.mp4", 24, 480, 854)],
    "small": [("gpusuite_image1.jpg", 1, 56, 70), ("gpusuite_video1.mp4", 12, 42, 56)],
}
CODES = ("own", "release")
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
            "summary": [line for line in text.splitlines()
                        if line.startswith("code checked:") or "comparisons," in line or "forwards:" in line]
            + closing[-1:]}


def release_copies(checkpoints: tuple[Path, Path], folder: Path) -> tuple[Path, Path]:
    """Copies of the (hf, packing) checkpoints that ship the release-format code (written once per folder)."""
    from tests.remote import add_release_code  # the repository root is on the path: `python -m bench` from there

    def copy_with_code(source: Path, side: str) -> Callable[[Path], Path]:
        return lambda partial: add_release_code(Path(shutil.copytree(source, partial)), side)

    hf, packing = (write_folder_once(folder / side, copy_with_code(source, side))
                   for side, source in zip(("hf", "packing"), checkpoints))
    return hf, packing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu-suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, run outputs, checkpoints, media")
    p.add_argument("--small", action="store_true", help="tiny config and media (runs on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--code", nargs="+", default=list(CODES), choices=CODES,
                   help="whose model code the checkpoints run: own (vitparity's classes), release (the release-format "
                        "files of tests/remote/release, with --trust-remote-code); default both")
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
            for code in args.code:
                paths = checkpoints if code == "own" else release_copies(
                    checkpoints, work / f"checkpoints-{dtype_name}-release")
                name = f"{dtype_name}-{code}"
                common = [f"-n={args.workers}", f"--hf-model={paths[0]}", f"--packing-model={paths[1]}",
                          f"--media={media}", f"--device={args.device}", f"--dtype={dtype_name}",
                          f"--golden-dir={work / ('golden-' + name)}", f"--report-dir={work / ('report-' + name)}",
                          f"--junitxml={work / ('junit-' + name + '.xml')}",
                          *(["--trust-remote-code"] if code == "release" else [])]
                for run, extra in (("update", ["--snapshot-update"]), ("check", [])):
                    log(f"[gpu-suite] {dtype_name} {code} code {run}: the whole suite, -n {args.workers}")
                    entry = run_pytest([*common, *extra], out / f"{name}-{run}.txt", args.timeout)
                    entry.update(dtype=dtype_name, code=code, run=run)
                    results["runs"].append(entry)
                    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
                    rows.append([dtype_name, code, run, str(entry["exit"]), f"{entry['wall_s']:.1f}",
                                 ", ".join(f"{n} {k}" for k, n in entry["counts"].items())])
                    for line in entry["summary"]:
                        log(f"  {line}")
    print_table(f"The whole suite on {results['machine']['device']} ({config}, -n {args.workers})",
                ["dtype", "code", "run", "exit", "wall s", "counts"], rows)
    log(f"wrote {out / 'results.json'}")
    return 0 if all(r["exit"] == 0 for r in results["runs"]) else 1
