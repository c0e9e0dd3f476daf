"""What every bench section shares: one timer, peak memory, host-sync counting, the FLOP model and its floor,
parity figures, table printing, progress lines, and child processes that end with the bench."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from vitparity.compare import compare_features

from .kernels import attention
from .kernels.rope import rope_status

GIB = 1024**3
# bf16 / fp16 matrix rates for the FLOP floor, by CUDA device name: 795 TFLOP/s is the rate the model facts use for
# the H100 SXM (nominal dense peak 989); the H200 has the same tensor cores and clocks (nominal 989), so the same.
KNOWN_FLOOR_TFLOPS = {"NVIDIA H100 80GB HBM3": 795.0, "NVIDIA H200": 795.0}
FLOOR_DTYPES = ("bfloat16", "float16")
# a step of a section that runs longer than this says so again on stderr, every this many seconds
PROGRESS_EVERY_S = 10.0


def log(*parts: object) -> None:
    print(*parts, flush=True)


def note(*parts: object) -> None:
    """A line on stderr (progress and warnings), so that stdout keeps the tables alone."""
    print(*parts, file=sys.stderr, flush=True)


def flop_floor(device_name: str, dtype_name: str, explicit: float | None) -> tuple[float | None, str]:
    """The matrix rate (TFLOP/s) the FLOP floor divides by, or None, and a line saying where it comes from.

    `explicit` (--floor-tflops) is always used. Otherwise a known GPU (`KNOWN_FLOOR_TFLOPS`, by the name
    `torch.cuda.get_device_name` gives; off CUDA `device_name` is the device type, e.g. "cpu") in bfloat16 or
    float16 gets its rate, and anything else none: a floor from another device's or dtype's rate means nothing.
    """
    if explicit is not None:
        return explicit, f"FLOP floor at {explicit} TFLOP/s (--floor-tflops)"
    known = KNOWN_FLOOR_TFLOPS.get(device_name)
    if known is not None and dtype_name in FLOOR_DTYPES:
        return known, f"FLOP floor at {known} TFLOP/s (the {dtype_name} matrix rate used for {device_name})"
    why = (f"{device_name} has no known matrix rate (known: {', '.join(KNOWN_FLOOR_TFLOPS)})" if known is None
           else f"the known rate of {device_name} is for bfloat16 / float16, not {dtype_name}")
    return None, f"no FLOP floor: {why}; pass --floor-tflops RATE to compare against RATE TFLOP/s"


def floor_seconds(floor_tflops: float | None, flops: float) -> float | None:
    """The FLOP floor in seconds: `flops` / the matrix rate; None where there is no rate (see flop_floor)."""
    return None if floor_tflops is None else flops / (floor_tflops * 1e12)


class Progress:
    """Progress of one long part of a section on stderr: `[label i/n] what` as each step starts (`[label] what`
    without a total) and, while a step runs on, `[label i/n] still running, N s` every `every` seconds (from a
    daemon thread).

    Use as a context manager around the steps; `step(what)` starts the next one.
    """

    def __init__(self, label: str, total: int | None = None, every: float = PROGRESS_EVERY_S) -> None:
        self.label, self.total, self.every = label, total, every
        self.done, self.started, self.last = 0, None, 0.0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _prefix(self) -> str:
        return f"[{self.label}]" if self.total is None else f"[{self.label} {self.done}/{self.total}]"

    def step(self, what: str) -> None:
        with self._lock:
            self.done += 1
            self.started = self.last = time.monotonic()
            note(f"{self._prefix()} {what}")

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every)):
            with self._lock:
                now = time.monotonic()
                if self.started is not None and now - self.last >= self.every:
                    self.last = now
                    note(f"{self._prefix()} still running, {now - self.started:.0f} s")


_CHILDREN: list[subprocess.Popen] = []


def start_child(command: list[str], **popen) -> subprocess.Popen:
    """`subprocess.Popen(command, **popen)` in a process group of its own, ended with everything it started (xdist
    workers) when the bench leaves `interruptible()` before the child has ended."""
    proc = subprocess.Popen(command, start_new_session=True, **popen)
    _CHILDREN.append(proc)
    return proc


def end_child(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after `grace_s` seconds; the child is reaped. A child already
    reaped is left alone (its group id may belong to another process by now)."""
    if proc.returncode is not None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(command: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """`command` to its end with stdout and stderr captured as text, like `subprocess.run`; after `timeout` seconds
    its process group is ended and TimeoutExpired raised."""
    proc = start_child(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_child(proc)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM inside `interruptible()`; exit status 143 (128 + 15)."""


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt, so that `with` blocks
    unwind (temporary folders are removed); on leaving, every child process still running is ended first.

    After the first SIGTERM further ones are ignored, so that they cannot cut the clean-up short.
    """
    def terminate(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        while _CHILDREN:
            end_child(_CHILDREN.pop())
        if signal.getsignal(signal.SIGTERM) is terminate:
            signal.signal(signal.SIGTERM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Device-aware clock: CUDA events on CUDA (no sync while marking), perf_counter elsewhere.

    `mark()` returns an opaque time point; `seconds(a, b)` the time between two (synchronises on CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.device.type == "cuda":
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    def measure(self, fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, list[float], object]:
        """Median and all seconds of `fn()` over `repeats` calls after `warmup` calls, and the last result."""
        for _ in range(warmup):
            fn()
        sync(self.device)
        times, out = [], None
        for _ in range(max(1, repeats)):
            out = None
            start = self.mark()
            out = fn()
            times.append(self.seconds(start, self.mark()))
        return statistics.median(times), times, out


@dataclass
class ForwardClock:
    """Times every forward of `model` (hooks) with the same Timer, to split a larger call into forward and rest."""

    model: torch.nn.Module
    timer: Timer
    pairs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(lambda *_: self.pairs.append([self.timer.mark(), None])),
            self.model.register_forward_hook(lambda *_: self.pairs[-1].__setitem__(1, self.timer.mark())),
        ]

    def total(self) -> float:
        return sum(self.timer.seconds(a, b) for a, b in self.pairs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def rss_peak_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GIB if sys.platform == "darwin" else 1024**2)


@contextmanager
def peak_memory(device: torch.device, result: dict) -> Iterator[None]:
    """Fills result with peak_gib and extra_gib (above what was allocated before): CUDA max allocated on CUDA;
    on the CPU the process's peak RSS (not resettable, so extra_gib is None)."""
    if device.type != "cuda":
        yield
        result.update(peak_gib=rss_peak_gib(), extra_gib=None, memory="process peak RSS")
        return
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    result.update(peak_gib=peak / GIB, extra_gib=(peak - base) / GIB, memory="cuda max allocated")


def count_syncs(fn: Callable[[], object], device: torch.device, seen: dict[str, int]) -> int | None:
    """Synchronising CUDA calls torch reports during fn() (set_sync_debug_mode); None off CUDA. Adds the
    messages to `seen`."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    # torch's one-time notice ("Synchronization debug mode is a prototype feature ...") is no sync
    found = [str(w.message)[:300] for w in caught
             if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    for message in found:
        seen[message] = seen.get(message, 0) + 1
    return len(found)


def model_flops(config, lengths: list[int]) -> float:
    """Linear layers (q, k, v, out, fc1, fc2) and attention (QK^T, PV: 4 n^2 D per sample) of every layer for
    packed samples of the given token counts; multiply-add = 2 FLOPs; patch embedding and head left out (< 1%)."""
    d, inter = config.hidden_size, config.intermediate_size
    n = sum(lengths)
    linear = 2 * n * (4 * d * d + 2 * d * inter)
    attention = sum(4 * m * m * d for m in lengths)
    return float(config.num_hidden_layers * (linear + attention))


def attention_flops(config, lengths: list[int]) -> float:
    """QK^T and PV of one layer call."""
    return float(sum(4 * m * m * config.hidden_size for m in lengths))


def parity(a: torch.Tensor, b: torch.Tensor, name: str) -> dict:
    """The project's comparison (float32, per-token cosine): min / mean cosine, max / mean |a - b|."""
    c = compare_features(a, b, name=name)
    return {"min_cos": c.min_cos, "mean_cos": c.mean_cos, "max_abs": c.max_abs, "mean_abs": c.mean_abs}


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "packed_backends": list(attention.available_backends(device, torch.bfloat16)),
        "sdpa_kernels": list(attention.available_sdpa_kernels(device, torch.bfloat16)),
        "rope": rope_status(device),
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / GIB, 1),
                    sms=props.multi_processor_count, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = "cpu"
    return info


def _git_commit() -> str | None:
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def fmt(value, spec: str = ".3f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    log(f"\n{title}")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    log("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in rows:
        log("  ".join(c.rjust(w) for c, w in zip(row, widths)))
