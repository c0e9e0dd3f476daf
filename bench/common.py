"""What every bench section shares: one timer, peak memory, host-sync counting, the FLOP model, parity figures
and table printing."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from vitparity.compare import compare_features
from vitparity.models import layers, packed_attention

GIB = 1024**3
# the bf16 matrix rate the model facts use for an H100 (nominal dense peak 989 TFLOP/s)
DEFAULT_FLOOR_TFLOPS = 795.0


def log(*parts: object) -> None:
    print(*parts, flush=True)


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
        "packed_backends": list(packed_attention.available_backends(device, torch.bfloat16)),
        "sdpa_kernels": list(packed_attention.available_sdpa_kernels(device, torch.bfloat16)),
        "rope": layers.rope_status(device),
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
