"""Pin each pytest-xdist worker to its own GPU before CUDA initialises."""

from __future__ import annotations

import os
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def worker_gpu(worker: str, visible: str | None, gpu_count: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES value for worker `gwN`: entry N mod len of the caller's own list when one is
    set, else GPU N mod gpu_count; None when there is no GPU to pin to."""
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else [
        str(i) for i in range(gpu_count)
    ]
    return devices[index % len(devices)] if devices else None


def pin_xdist_worker_gpu(requested: str) -> str | None:
    """Set CUDA_VISIBLE_DEVICES for this xdist worker; returns the pinned device (None: left as it was).

    Called from the suite's `pytest_configure`, before anything initialises CUDA; never at import. Only a device
    that names no index (`auto`, `cuda`) is pinned: `--device=cuda:N` runs every worker on GPU N, as asked, and the
    CPU needs no pin. No-op outside xdist. Counts GPUs from the driver's /proc entries (does not initialise CUDA).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or requested.strip() not in ("auto", "cuda"):
        return None
    count = len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0
    device = worker_gpu(worker, os.environ.get("CUDA_VISIBLE_DEVICES"), count)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    return device
