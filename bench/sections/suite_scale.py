"""How the suite's cost grows with the work: the parity suite from the shell on the built-in models, with 0, 8 and
48 (by default) extra synthetic videos, serial and under xdist.

After one warm-up process (not measured), for each run: wall time from launch to exit, peak memory, and the suite's own cost lines
(`forwards: hf N (T tokens), packing M (U tokens)` per process and in total). Peak memory is measured twice:
- largest process: the peak RSS of the largest single process of the run (the pytest process or one xdist
  worker), from the rusage that os.wait4 returns for the run (what /usr/bin/time -v reports);
- process tree: the largest sum of the RSS of the run's processes seen by sampling /proc every 50 ms.
Figures against the targets of the scale work: peak RSS at the largest count over the smallest (<= 1.25x), wall
time per extra case at both counts (flat within 1.2x), the same total forwards and tokens under each -n as in the
serial run, and the busiest worker's tokens over the mean (<= 1.3x with at least 4 pack groups per worker).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..common import Progress, log, print_table, start_child
from ..workloads import write_media

REPO = Path(__file__).resolve().parents[2]
PAGE = os.sysconf("SC_PAGE_SIZE")
COST = re.compile(r"^(\w+): forwards: hf (\d+) \((\d+) tokens\), packing (\d+) \((\d+) tokens\); .*pack groups (\d+)",
                  re.MULTILINE)
OUTCOME = re.compile(r"(\d+) passed.* in ([\d.]+)s")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss(pid: int) -> int:
    """RSS bytes of `pid` and all its descendants now (0 for processes that ended meanwhile)."""
    tree, total, todo = _children(), 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(tree.get(current, []))
        try:
            with open(f"/proc/{current}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    return total


def suite_command(media: Path | None, workers: int, pack_tokens: int | None, extra: str = "") -> list[str]:
    """The command a user types, plus -n, --pack-tokens and `extra` options when asked."""
    command = [sys.executable, "-m", "pytest", "-m", "not golden", "--device=cpu", "-p", "no:cacheprovider", "-q",
               *shlex.split(extra)]
    if media is not None:
        command.append(f"--media={media}")
    if workers:
        command += ["-n", str(workers)]
    if pack_tokens:
        command.append(f"--pack-tokens={pack_tokens}")
    return command


def run_measured(command: list[str], log_path: Path, timeout: float) -> dict:
    """Run `command` from the repository root; wall time, both peak memories and its cost lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as out, Progress(log_path.stem) as progress:
        progress.step(shlex.join(command))
        start = time.perf_counter()
        proc = start_child(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
            sampler.join()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"suite run failed (exit {proc.returncode}): {shlex.join(command)}\n{text[-4000:]}")
    costs = {m.group(1): {"hf": int(m.group(2)), "hf_tokens": int(m.group(3)), "packing": int(m.group(4)),
                          "packing_tokens": int(m.group(5)), "groups": int(m.group(6))} for m in COST.finditer(text)}
    if not costs:
        raise RuntimeError(f"no cost line in the output of {shlex.join(command)}\n{text[-4000:]}")
    passed = OUTCOME.search(text)
    return {"command": shlex.join(command), "wall_s": wall, "largest_process_rss_gib": usage.ru_maxrss / 1024**2,
            "tree_rss_gib": peak[0] / 1024**3, "costs": costs, "passed": int(passed.group(1)) if passed else 0,
            "cost_lines": [line for line in text.splitlines() if COST.match(line)]}


def _total(run: dict) -> dict:
    """The run's total cost: the `total` line under xdist, the single process's line otherwise."""
    costs = run["costs"]
    return costs.get("total") or next(iter(costs.values()))


def _worker_tokens(run: dict) -> dict[str, int]:
    return {name: c["hf_tokens"] + c["packing_tokens"] for name, c in run["costs"].items() if name != "total"}


def run_suite_scale(opts, workdir: Path, results: dict) -> None:
    """Serial runs at each count of extra videos, then runs under each -n at the largest count."""
    height, width = opts.suite_scale_size
    frames, counts = opts.suite_scale_frames, sorted(opts.suite_scale_counts)
    entry = results["suite_scale"] = {"videos": [frames, height, width], "counts": counts, "serial": {}, "workers": {}}
    folders = {}
    for count in counts:
        folders[count] = workdir / f"suite-scale-{count}-{height}x{width}x{frames}"
        write_media(folders[count], [(f"scale_{i:03d}.mp4", frames, height, width) for i in range(count)],
                    seed=500, label=f"suite-scale {count}")
    # A first process pays for reading Python, torch and the media from disk: run one before the measured runs.
    run_measured(suite_command(None, 0, None, opts.suite_scale_args), workdir / "suite-scale-warmup.log",
                 opts.suite_timeout)
    for count in [0, *counts]:
        command = suite_command(folders.get(count), 0, None, opts.suite_scale_args)
        entry["serial"][count] = run = run_measured(command, workdir / f"suite-scale-serial-{count}.log",
                                                    opts.suite_timeout)
        log(f"  {count} extra videos, serial: {run['wall_s']:.1f} s, {run['passed']} passed; "
            f"{' | '.join(run['cost_lines'])}")
    largest = counts[-1]
    for workers in opts.suite_scale_workers:
        command = suite_command(folders[largest], workers, opts.suite_scale_pack_tokens, opts.suite_scale_args)
        entry["workers"][workers] = run = run_measured(
            command, workdir / f"suite-scale-n{workers}.log", opts.suite_timeout)
        log(f"  {largest} extra videos, -n {workers}: {run['wall_s']:.1f} s; {' | '.join(run['cost_lines'])}")
    if opts.suite_scale_pack_tokens:  # the serial reference for the runs under -n uses the same budget
        entry["workers"][0] = run_measured(
            suite_command(folders[largest], 0, opts.suite_scale_pack_tokens, opts.suite_scale_args),
            workdir / "suite-scale-n0.log", opts.suite_timeout)
    else:
        entry["workers"][0] = entry["serial"][largest]
    _print(entry, results)


def _print(entry: dict, results: dict) -> None:
    serial, counts = entry["serial"], entry["counts"]
    base = serial[0]["wall_s"]
    rows = []
    for count in [0, *counts]:
        run, total = serial[count], _total(serial[count])
        per_case = (run["wall_s"] - base) / count if count else None
        entry.setdefault("per_extra_case_s", {})[count] = per_case
        rows.append([str(count), str(run["passed"]), f"{run['wall_s']:.1f}", f"{per_case:.3f}" if count else "-",
                     f"{run['largest_process_rss_gib']:.2f}", f"{run['tree_rss_gib']:.2f}",
                     f"hf {total['hf']} ({total['hf_tokens']}), packing {total['packing']} ({total['packing_tokens']})",
                     str(total["groups"])])
    frames, height, width = entry["videos"]
    print_table(f"Suite cost growth, serial: extra {frames}-frame {width}x{height} mp4v videos, "
                f"{results['machine']['device']}, built-in models\n  {serial[counts[-1]]['command']}",
                ["extra", "passed", "wall s", "s/extra case", "peak RSS GiB", "tree RSS GiB",
                 "forwards (tokens)", "groups"], rows)
    small, large = serial[counts[0]], serial[counts[-1]]
    entry["rss_ratio"] = large["largest_process_rss_gib"] / small["largest_process_rss_gib"]
    entry["per_case_ratio"] = entry["per_extra_case_s"][counts[-1]] / entry["per_extra_case_s"][counts[0]]
    log(f"  peak RSS {counts[-1]} vs {counts[0]}: {entry['rss_ratio']:.2f}x (target <= 1.25x); wall time per extra "
        f"case {counts[-1]} vs {counts[0]}: {entry['per_case_ratio']:.2f}x (target within 1.2x)")
    rows = []
    reference = _total(entry["workers"][0])
    for workers, run in sorted(entry["workers"].items()):
        total, tokens = _total(run), _worker_tokens(run)
        mean = sum(tokens.values()) / len(tokens)
        run["busiest_over_mean"] = max(tokens.values()) / mean
        run["same_as_serial"] = all(total[k] == reference[k] for k in ("hf", "hf_tokens", "packing", "packing_tokens"))
        rows.append([str(workers or "serial"), f"{run['wall_s']:.1f}",
                     f"hf {total['hf']} ({total['hf_tokens']}), packing {total['packing']} ({total['packing_tokens']})",
                     "yes" if run["same_as_serial"] else "NO", str(total["groups"]),
                     " ".join(str(tokens[name]) for name in sorted(tokens)), f"{run['busiest_over_mean']:.2f}",
                     f"{run['largest_process_rss_gib']:.2f}", f"{run['tree_rss_gib']:.2f}"])
    print_table(f"Suite under xdist, {counts[-1]} extra videos\n  {entry['workers'][max(entry['workers'])]['command']}",
                ["-n", "wall s", "total forwards (tokens)", "= serial", "groups", "tokens per worker",
                 "busiest/mean", "peak RSS GiB", "tree RSS GiB"], rows)
