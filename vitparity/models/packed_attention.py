"""Block-diagonal attention over a packed sequence, without an N x N mask.

Backends (see docs/benchmarks.md for measurements):
- "sdpa": one scaled_dot_product_attention call per sample (any device, any dtype);
- "varlen": torch.nn.attention.varlen.varlen_attn (CUDA, fp16 / bf16);
- "flash_attn": flash-attn's flash_attn_varlen_func, when that package is installed (CUDA, fp16 / bf16).
"auto" picks flash_attn, then varlen, on CUDA in half precision, and sdpa otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "varlen", "flash_attn")


@dataclass(frozen=True)
class PackedSegments:
    """Sample boundaries of a packed sequence, on the host (lengths) and on the device (cu_seqlens)."""

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor  # (S + 1,) int32 on the sequence's device

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...], device: torch.device) -> "PackedSegments":
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"every packed sample needs at least one token, got lengths {lengths}")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return cls(lengths, torch.tensor(offsets, dtype=torch.int32, device=device))

    @property
    def max_length(self) -> int:
        return max(self.lengths)


def _has_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend that will run for this query tensor."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _has_flash_attn():
            return "flash_attn"
        if _has_varlen():
            return "varlen"
    return "sdpa"


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, scale: float, backend: str = "auto"
) -> torch.Tensor:
    """q, k, v (N, H, head_dim) -> (N, H, head_dim); token i attends only to tokens of its own sample."""
    chosen = resolve_backend(backend, q)
    if chosen == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        m = segments.max_length
        return flash_attn_varlen_func(q, k, v, segments.cu_seqlens, segments.cu_seqlens, m, m, softmax_scale=scale)
    if chosen == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        m = segments.max_length
        return varlen_attn(q, k, v, segments.cu_seqlens, segments.cu_seqlens, m, m, scale=scale)
    outputs = []
    start = 0
    for n in segments.lengths:
        sl = slice(start, start + n)
        out = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1), scale=scale
        )
        outputs.append(out.transpose(0, 1))
        start += n
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
