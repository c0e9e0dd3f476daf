"""Attention kernels of both encoders: dense SDPA on a chosen backend, and block-diagonal packed attention.

Dense (non-packing model) `sdpa_attention`, kernel choices (`SDPA_KERNELS`):
- "default": torch's own order (on CUDA: flash, efficient, math, cuDNN last);
- "cudnn", "flash", "efficient", "math": that kernel first, the others after it as fallbacks;
- "auto": `AUTO_SDPA_KERNEL` on CUDA in half precision (measured fastest, docs/benchmarks.md), "default" otherwise.

Packed (packing model) `packed_attention`, never with an N x N mask, backends (`BACKENDS`):
- "sdpa": one scaled_dot_product_attention call per sample, on the kernel chosen as above (any device, dtype);
- "varlen": torch.nn.attention.varlen.varlen_attn (CUDA, fp16 / bf16, torch >= 2.10);
- "nested": SDPA on a jagged nested tensor (CUDA, fp16 / bf16);
- "flash_attn": flash-attn's flash_attn_varlen_func, when that package is installed (CUDA, fp16 / bf16);
- "auto": `AUTO_PACKED_BACKEND` on CUDA in half precision, "sdpa" otherwise. flash_attn runs only when named:
  it was not measured, and torch's own FA2 kernel ran slower than cuDNN at head_dim 64 (docs/benchmarks.md).

Nothing here reads a device tensor back to the host: sample lengths live on the host (`PackedSegments`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "varlen", "nested", "flash_attn")
SDPA_KERNELS = ("auto", "default", "cudnn", "flash", "efficient", "math")


def choice_property(name: str, choices: tuple[str, ...], doc: str) -> property:
    """A model attribute that only takes one of `choices` (stored as `_<name>`); others raise ValueError."""

    def get(self) -> str:
        return getattr(self, f"_{name}")

    def set_(self, value: str) -> None:
        if value not in choices:
            raise ValueError(f"unknown {name.replace('_', ' ')} {value!r}; choose one of {choices}")
        setattr(self, f"_{name}", value)

    return property(get, set_, doc=doc)

# Chosen from H100 measurements (docs/benchmarks.md); "auto" resolves to these on CUDA in fp16 / bf16.
AUTO_SDPA_KERNEL = "cudnn"
AUTO_PACKED_BACKEND = "sdpa"


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


@lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _has_varlen() -> bool:
    return _has_module("torch.nn.attention.varlen")


def _has_flash_attn() -> bool:
    return _has_module("flash_attn")


@lru_cache(maxsize=None)
def _accepts_scale(func) -> bool:
    import inspect

    try:
        return "scale" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True


def _fast_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def resolve_sdpa_kernel(kernel: str, q: torch.Tensor) -> str:
    """The SDPA kernel preference that will be used for this query tensor."""
    if kernel not in SDPA_KERNELS:
        raise ValueError(f"unknown SDPA kernel {kernel!r}; choose one of {SDPA_KERNELS}")
    if kernel == "auto":
        return AUTO_SDPA_KERNEL if _fast_cuda(q) else "default"
    return kernel


def _sdpa_order(kernel: str) -> list:
    from torch.nn.attention import SDPBackend

    names = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    first = names[kernel]
    return [first] + [b for b in names.values() if b != first]


def _sdpa_context(kernel: str, q: torch.Tensor):
    """A context that makes SDPA try `kernel` first (fallbacks after it); a no-op for "default"."""
    if kernel == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    order = _sdpa_order(kernel)
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: restrict to the chosen kernel and the math fallback
        return sdpa_kernel([order[0], order[-1]] if kernel != "math" else [order[0]])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernel: str = "auto") -> torch.Tensor:
    """Bidirectional attention of (B, H, N, head_dim) tensors on the chosen SDPA kernel."""
    chosen = resolve_sdpa_kernel(kernel, q)
    with _sdpa_context(chosen, q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The packed attention backend that will run for this query tensor."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        if backend in ("varlen", "nested", "flash_attn") and not _fast_cuda(q):
            raise ValueError(f"packed attention backend {backend!r} needs a CUDA tensor in float16 / bfloat16")
        if backend == "flash_attn" and not _has_flash_attn():
            raise ValueError("packed attention backend 'flash_attn' needs the flash-attn package, which is not installed")
        if backend == "varlen" and not _has_varlen():
            raise ValueError(f"packed attention backend 'varlen' needs torch.nn.attention.varlen (torch {torch.__version__})")
        return backend
    if _fast_cuda(q):
        if AUTO_PACKED_BACKEND == "varlen" and not _has_varlen():
            return "sdpa"
        return AUTO_PACKED_BACKEND
    return "sdpa"


def _per_sample_sdpa(q, k, v, segments: PackedSegments, scale: float, kernel: str) -> torch.Tensor:
    """One SDPA call per sample on (1, H, n, head_dim) views of the packed tensors."""

    def heads(x: torch.Tensor, sl: slice) -> torch.Tensor:
        return x[sl].transpose(0, 1).unsqueeze(0)

    if len(segments.lengths) == 1:
        whole = slice(None)
        return sdpa_attention(heads(q, whole), heads(k, whole), heads(v, whole), scale, kernel)[0].transpose(0, 1)
    out = q.new_empty(q.shape)
    start = 0
    for n in segments.lengths:
        sl = slice(start, start + n)
        out[sl] = sdpa_attention(heads(q, sl), heads(k, sl), heads(v, sl), scale, kernel)[0].transpose(0, 1)
        start += n
    return out


def _nested_sdpa(q, k, v, segments: PackedSegments, scale: float, kernel: str) -> torch.Tensor:
    offsets = segments.cu_seqlens.to(torch.int64)

    def jagged(x: torch.Tensor) -> torch.Tensor:
        nt = torch.nested.nested_tensor_from_jagged(
            x, offsets, min_seqlen=segments.min_length, max_seqlen=segments.max_length
        )
        return nt.transpose(1, 2)  # (S, H, j, head_dim)

    out = sdpa_attention(jagged(q), jagged(k), jagged(v), scale, kernel)
    return out.transpose(1, 2).values()


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: PackedSegments,
    scale: float,
    backend: str = "auto",
    sdpa_kernel: str = "auto",
) -> torch.Tensor:
    """q, k, v (N, H, head_dim) -> (N, H, head_dim); token i attends only to tokens of its own sample."""
    chosen = resolve_backend(backend, q)
    m = segments.max_length
    if chosen == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, segments.cu_seqlens, segments.cu_seqlens, m, m, softmax_scale=scale)
    if chosen == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        kwargs = {"scale": scale}
        if not _accepts_scale(varlen_attn):  # an early varlen_attn: always head_dim ** -0.5
            if abs(scale - q.shape[-1] ** -0.5) > 1e-12:
                raise ValueError("this torch's varlen_attn has no `scale` argument; use backend 'sdpa'")
            kwargs = {}
        return varlen_attn(q, k, v, segments.cu_seqlens, segments.cu_seqlens, m, m, **kwargs)
    if chosen == "nested":
        return _nested_sdpa(q, k, v, segments, scale, sdpa_kernel)
    return _per_sample_sdpa(q, k, v, segments, scale, sdpa_kernel)
