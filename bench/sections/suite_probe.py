"""A pytest plugin the suite-run section loads (`-p bench.sections.suite_probe`) to see inside the suite process.

It records, and writes as JSON to the file named by $BENCH_SUITE_PROBE at the end of the session:
- when this plugin was imported and when the session started, against $BENCH_T0 (the launcher's time.time()
  just before it started the process): python, pytest, plugin and library imports and collection before tests;
- every test phase's duration (setup / call / teardown), as pytest measures it;
- every forward of a OneVision-Encoder model: count and seconds per model class (CUDA events on CUDA);
- peak memory: CUDA max allocated (when CUDA was used) and the process's peak RSS.
"""

from __future__ import annotations

import json
import os
import time

IMPORTED = time.time()
_STATE: dict = {"tests": [], "forwards": {}, "marks": []}


def pytest_sessionstart(session) -> None:
    import torch

    from vitparity.models import OneVisionEncoderPreTrainedModel

    _STATE["session_start"] = time.time()

    def mark():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def before(module, args):
        if isinstance(module, OneVisionEncoderPreTrainedModel):
            _STATE["marks"].append((type(module).__name__, mark(), None))

    def after(module, args, output):
        if isinstance(module, OneVisionEncoderPreTrainedModel):
            name, start, _ = _STATE["marks"][-1]
            _STATE["marks"][-1] = (name, start, mark())

    _STATE["handles"] = [torch.nn.modules.module.register_module_forward_pre_hook(before),
                         torch.nn.modules.module.register_module_forward_hook(after)]


def pytest_runtest_logreport(report) -> None:
    _STATE["tests"].append({"nodeid": report.nodeid, "when": report.when, "duration_s": report.duration,
                            "outcome": report.outcome})


def pytest_sessionfinish(session, exitstatus) -> None:
    import resource

    import torch

    path = os.environ.get("BENCH_SUITE_PROBE")
    if not path:
        return
    forwards: dict[str, dict] = {}
    for name, start, end in _STATE["marks"]:
        if end is None:
            continue
        if isinstance(start, float):
            seconds = end - start
        else:
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        entry = forwards.setdefault(name, {"count": 0, "seconds": 0.0})
        entry["count"] += 1
        entry["seconds"] += seconds
    t0 = float(os.environ.get("BENCH_T0", IMPORTED))
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    data = {
        "plugin_imported_after_s": IMPORTED - t0,
        "session_start_after_s": _STATE.get("session_start", IMPORTED) - t0,
        "session_finish_after_s": time.time() - t0,
        "exitstatus": int(exitstatus),
        "tests": _STATE["tests"],
        "forwards": forwards,
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
