"""Pinned numerics: float32 on CUDA means IEEE float32, not TF32.

PyTorch may run float32 matmuls and convolutions (the patch embedding is a convolution) in TF32 on recent GPUs,
depending on global flags that any imported library can change. `pinned_float32` turns TF32 off for matmul
and cuDNN for the duration of a run and restores the previous flags afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def tf32_setting(device: str | torch.device, dtype: torch.dtype) -> bool | str:
    """What provenance records: False for a float32 run on CUDA (inside `pinned_float32`), else why TF32 does not apply."""
    if not _on_cuda(device):
        return "n/a on cpu"
    if dtype != torch.float32:
        return f"n/a for {str(dtype).removeprefix('torch.')}"
    return False


@contextmanager
def pinned_float32(device: str | torch.device, dtype: torch.dtype) -> Iterator[bool | str]:
    """Within the block, float32 on CUDA runs without TF32 (matmul and cuDNN); yields `tf32_setting`.

    Other devices and dtypes leave the flags untouched.
    """
    setting = tf32_setting(device, dtype)
    if setting is not False:
        yield setting
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield setting
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
