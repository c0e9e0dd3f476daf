"""Attention of both encoders: dense attention, and block-diagonal packed attention as one call per sample.

transformers' `config._attn_implementation` picks the maths (`ATTN_IMPLEMENTATIONS`):
- "sdpa" (the default): torch's scaled_dot_product_attention, cuDNN tried first on CUDA in float16 / bfloat16
  (measured fastest on an H100, docs/benchmarks.md), torch's own order otherwise;
- "eager": softmax(q k^T) v written out, the softmax in float32 (transformers' "eager").
The packing model runs either once per sample of the pack, never with an N x N mask. Other kernels (varlen,
nested, flash-attn, FlexAttention, the SDPA kernel switches, a Triton RoPE) are benchmark variants: bench/kernels/.

Nothing here reads a device tensor back to the host: sample lengths live on the host (`PackedSegments`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


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
        return cls(lengths, host_to_device(torch.tensor(offsets, dtype=torch.int32), device))

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def min_length(self) -> int:
        return min(self.lengths)


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a small host tensor to `device` without making the host wait for the device's queue.

    A plain copy from pageable memory synchronises the stream; a pinned buffer with non_blocking does not.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def check_implementation(implementation: str) -> str:
    """`implementation` when these models run it; ValueError naming the ones they do otherwise."""
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {implementation!r} is not supported by these models; use one of "
                         f"{ATTN_IMPLEMENTATIONS}")
    return implementation


def sdpa_kernel_of(q: torch.Tensor) -> str:
    """The SDPA kernel tried first for tensors like `q`: "cudnn" on CUDA in float16 / bfloat16, else "default"."""
    return "cudnn" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else "default"


def _sdpa_context(q: torch.Tensor) -> contextlib.AbstractContextManager:
    """cuDNN first (the others after it as fallbacks) where `sdpa_kernel_of` says so; a no-op elsewhere."""
    if sdpa_kernel_of(q) == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: cuDNN with the math fallback
        return sdpa_kernel([order[0], order[-1]])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Bidirectional attention of (B, H, N, head_dim) tensors by scaled_dot_product_attention."""
    with _sdpa_context(q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v of (..., N, head_dim) tensors, the softmax in float32 (transformers' "eager")."""
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(weights.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    implementation: str = "sdpa") -> torch.Tensor:
    """Bidirectional attention of (B, H, N, head_dim) tensors by transformers' attn_implementation name."""
    attend = eager_attention if check_implementation(implementation) == "eager" else sdpa_attention
    return attend(q, k, v, scale)


def per_sample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments,
               attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`attend` once per sample on (1, H, n, head_dim) views of the packed (N, H, head_dim) tensors."""

    def heads(x: torch.Tensor, sl: slice) -> torch.Tensor:
        return x[sl].transpose(0, 1).unsqueeze(0)

    if len(segments.lengths) == 1:
        whole = slice(None)
        return attend(heads(q, whole), heads(k, whole), heads(v, whole))[0].transpose(0, 1)
    out = q.new_empty(q.shape)
    start = 0
    for n in segments.lengths:
        sl = slice(start, start + n)
        out[sl] = attend(heads(q, sl), heads(k, sl), heads(v, sl))[0].transpose(0, 1)
        start += n
    return out


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, scale: float,
                     implementation: str = "sdpa") -> torch.Tensor:
    """q, k, v (N, H, head_dim) -> (N, H, head_dim); token i attends only to tokens of its own sample."""
    return per_sample(q, k, v, segments, lambda a, b, c: dense_attention(a, b, c, scale, implementation))


def packed_implementation(model: torch.nn.Module) -> str | None:
    """The attn_implementation a loaded model of vitparity's classes (or a subclass) runs; None for another
    model (a checkpoint's own classes)."""
    from .modeling_onevision_encoder import OneVisionEncoderPreTrainedModel

    if not isinstance(model, OneVisionEncoderPreTrainedModel):
        return None
    return check_implementation(model.config._attn_implementation)


def attention_record(model: torch.nn.Module) -> str:
    """What a loaded packing model's attention runs, for the goldens' provenance: "packed backend sdpa, attention
    kernel cudnn" for vitparity's classes (the kernel on their parameters' device and dtype); "the checkpoint
    code's own" for a checkpoint's own classes."""
    implementation = packed_implementation(model)
    if implementation is None:
        return "the checkpoint code's own"
    kernel = sdpa_kernel_of(next(model.parameters())) if implementation == "sdpa" else "none"
    return f"packed backend {implementation}, attention kernel {kernel}"
