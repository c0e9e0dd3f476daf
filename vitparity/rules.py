"""The rules on values a user gives (threshold, frames per video, device and dtype) and the error of the pair's
rules, in a module that imports nothing heavy: the CLI and the suite's options refuse a bad value before torch and
transformers load. `vitparity.pair` holds the rules that read the checkpoints.
"""

from __future__ import annotations

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


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """Resolve `auto` (cuda when available; bfloat16 on cuda, float32 on cpu) and refuse what cannot run.

    Does not check that a requested CUDA device exists (`loading.missing_cuda_device`): callers decide whether that
    is an error or a skip.
    """
    if device == "auto":
        import torch  # only here: every other value is checked without it

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device {device!r}: use cpu, cuda, cuda:N or auto")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)} or auto")
    if device == "cpu" and dtype == "float16":
        raise ValueError("unsupported dtype on CPU: float16 (use float32 or bfloat16 on CPU, or a cuda device)")
    return device, dtype
