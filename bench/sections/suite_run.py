"""The parity suite from the shell, as a user runs it: `python -m pytest` on a media set with checkpoints the bench
writes, process wall time of a first (cold) and a second (warm) run, the suite's own summary lines, and a look
inside the process (bench/sections/suite_probe.py): start-up, test phases, forwards per model, peak memory."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..common import Progress, log, print_table, run_child
from ..workloads import write_media

REPO = Path(__file__).resolve().parents[2]
PASSED = re.compile(r"(\d+) passed.* in ([\d.]+)s")
COMPARISONS = re.compile(r"(\d+) comparisons, (\d+) passed, (\d+) failed")
LOADS = re.compile(r"^(\w+): forwards: .*; model loads: hf (\d+), packing (\d+)", re.M)  # the suite's cost lines


def write_folder_once(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(folder)` fills a folder that becomes `path`, unless `path` exists: written into a temporary folder
    renamed when complete, so that an interrupted run leaves no partial folder to be reused."""
    if not path.exists():
        partial = path.with_name(f".{path.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            write(partial)
            partial.rename(path)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return path


def write_checkpoints(hf, packing, folder: Path) -> tuple[Path, Path]:
    """Both models as safetensors checkpoints (in their current dtype), written once per folder
    (`write_folder_once`)."""
    return (write_folder_once(folder / "hf", hf.save_pretrained),
            write_folder_once(folder / "packing", packing.save_pretrained))


def suite_command(opts, checkpoints: tuple[Path, Path], media: Path, select: str) -> list[str]:
    """The pytest command line a user would type (plus the probe plugin): every non-golden test selected by -k."""
    return [sys.executable, "-m", "pytest", "-m", "not golden", "-k", select, "-q",
            "-p", "no:cacheprovider", "-p", "bench.sections.suite_probe", f"--hf-model={checkpoints[0]}",
            f"--packing-model={checkpoints[1]}", f"--media={media}", f"--device={opts.device}",
            f"--dtype={opts.dtype_name}", "--durations=0"]


def run_suite_once(command: list[str], probe: Path, timeout: float) -> dict:
    """One process: wall time from launch to exit, the suite's summary lines, and the probe's figures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "BENCH_SUITE_PROBE": str(probe), "BENCH_T0": repr(time.time())}
    start = time.perf_counter()
    proc = run_child(command, timeout, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"suite run failed (exit {proc.returncode}): {' '.join(command)}\n{out[-4000:]}")
    passed = PASSED.search(out)
    comparisons = COMPARISONS.search(out)
    inside = json.loads(probe.read_text())
    forward_s = sum(entry["seconds"] for entry in inside["forwards"].values())
    return {
        "process_wall_s": wall,
        "pytest_reported_s": float(passed.group(2)) if passed else None,
        "tests_passed": int(passed.group(1)) if passed else 0,
        "comparisons": [int(x) for x in comparisons.groups()] if comparisons else None,
        "model_loads": {m.group(1): {"hf": int(m.group(2)), "packing": int(m.group(3))} for m in LOADS.finditer(out)},
        "startup_s": inside["session_start_after_s"],
        "forwards": inside["forwards"],
        "forward_s": forward_s,
        "wall_over_forwards": wall / forward_s if forward_s else None,
        "phases_s": _phase_totals(inside["tests"]),
        "cuda_peak_gib": inside["cuda_peak_gib"],
        "rss_peak_gib": inside["rss_peak_gib"],
        "summary_lines": [line for line in out.splitlines() if COMPARISONS.search(line) or LOADS.search(line)
                          or PASSED.search(line)],
    }


def _phase_totals(tests: list[dict]) -> dict[str, float]:
    """Seconds per (test function, phase), e.g. "test_parity call"; the parametrisation is dropped."""
    totals: dict[str, float] = {}
    for t in tests:
        name = t["nodeid"].split("::")[-1].split("[")[0]
        key = f"{name} {t['when']}"
        totals[key] = totals.get(key, 0.0) + t["duration_s"]
    return totals


def run_suite(opts, hf, packing, workdir: Path, results: dict, *, label: str, files: list, select: str,
              runs: tuple[str, ...]) -> None:
    """Write the media and checkpoints, then run the suite from the shell once per name in `runs` (the first is
    cold: first process on these files; OS file cache and compiled-kernel caches are not cleared)."""
    media = workdir / f"media-{label}"
    write_media(media, files, seed=300, label=label)
    with Progress(label, 1 + len(runs)) as progress:
        progress.step(f"checkpoints of both models ({opts.dtype_name})")
        checkpoints = write_checkpoints(hf, packing, workdir / f"checkpoints-{opts.dtype_name}")
        command = suite_command(opts, checkpoints, media, select)
        entry = {"command": shlex.join(command), "files": [list(f) for f in files], "runs": {}}
        results["suite_run"][label] = entry
        for run in runs:
            progress.step(f"{run} run of the suite on {len(files)} files (a pytest process)")
            entry["runs"][run] = run_suite_once(command, workdir / f"probe-{label}-{run}.json", opts.suite_timeout)
    rows = []
    for run, r in entry["runs"].items():
        by_model = ", ".join(f"{k} {v['count']} x = {v['seconds']:.2f} s" for k, v in r["forwards"].items())
        rows.append([run, f"{r['process_wall_s']:.2f}", f"{r['startup_s']:.2f}", str(r["pytest_reported_s"]),
                     f"{r['forward_s']:.2f}", f"{r['wall_over_forwards']:.2f}" if r["wall_over_forwards"] else "n/a",
                     str(r["tests_passed"]), by_model])
    print_table(f"Suite from the shell, {label}: {len(files)} files, {opts.dtype_name} on "
                f"{results['machine']['device']}\n  {entry['command']}",
                ["run", "wall s", "start-up s", "pytest s", "forwards s", "wall/fwd", "passed", "forwards by model"],
                rows)
    for run, r in entry["runs"].items():
        log(f"  {run}: " + "; ".join(f"{k} {v:.2f} s" for k, v in sorted(r["phases_s"].items())))
        log(f"  {run}: peak CUDA {r['cuda_peak_gib']} GiB, peak RSS {r['rss_peak_gib']:.2f} GiB; "
            + " | ".join(r["summary_lines"]))
