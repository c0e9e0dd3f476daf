"""The rules on values a user gives (threshold, frames per video, device and dtype) and the error of the pair's
rules, in a module that imports nothing heavy (torch only to resolve device auto or check a CUDA device): the CLI and
the suite's options refuse a bad value before transformers loads. `vitparity.pair` holds the rules that read the
checkpoints.
"""

from __future__ import annotations

import os

from .choices import DTYPE_NAMES
from .hub import ModelLoadError

# The two models of a pair: "hf" (non-packing, pixel_values) and "packing" (flat patches + grid_thw).
SIDES = ("hf", "packing")


class PairError(ModelLoadError):
    """Two checkpoints (or a setting) that break a model-pair rule; the message names the inputs and the rule."""


def check_threshold(value: float, name: str = "threshold") -> float:
    """The threshold rule: a minimum per-token cosine strictly between 0 and 1 (NaN refused)."""
    if not 0.0 < value < 1.0:
        raise PairError(f"{name}={value}: must be in (0, 1)")
    return value


def check_num_frames(num_frames: int, context: int | None, hf_where: str, name: str = "num_frames") -> int:
    """The frames rule: at least one frame, and no more than the hf model's temporal RoPE context (None: no limit)."""
    if num_frames < 1:
        raise PairError(f"{name}={num_frames}: must be >= 1")
    if context is not None and num_frames > context:
        raise PairError(
            f"{name}={num_frames} does not fit the temporal context of {hf_where} (rope_temporal_size={context}): "
            f"sample at most {context} frames per video"
        )
    return num_frames


def missing_cuda_device(device: str) -> str | None:
    """Why a resolved CUDA `device` cannot be used on this machine (None when it can, or for the CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch  # only for a CUDA device

    if not torch.cuda.is_available():
        return "CUDA is not available"
    count = torch.cuda.device_count()
    if device.startswith("cuda:") and int(device[5:]) >= count:
        return f"{count} CUDA device(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
    return None


def resolve_device_dtype(device: str, dtype: str, device_label: str = "--device",
                         dtype_label: str = "--dtype") -> tuple[str, str]:
    """Resolve `auto` (cuda when available; bfloat16 on cuda, float32 on cpu) and refuse what cannot run: the device
    rule of the suite and the CLI. A requested device that is absent (cuda without CUDA, cuda:3 with two GPUs) is an
    error, never a skip. ValueError naming the option by `device_label` / `dtype_label` (as the user gave it)."""
    if device == "auto":
        import torch  # only here and for a CUDA device: every other value is checked without it

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"{device_label}={device}: use cpu, cuda, cuda:N or auto")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"{dtype_label}={dtype}: use one of {', '.join(DTYPE_NAMES)} or auto")
    if device == "cpu" and dtype == "float16":
        raise ValueError(f"{dtype_label}=float16: unsupported dtype on CPU (use float32 or bfloat16 on CPU, or a cuda "
                         "device)")
    problem = missing_cuda_device(device)
    if problem:
        raise ValueError(f"{device_label}={device}: requested but {problem}")
    return device, dtype
