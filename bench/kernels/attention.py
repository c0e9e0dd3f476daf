"""Attention kernel variants of both encoders, measured by the benchmarks (never run by the gate).

Dense (non-packing model) `sdpa_attention`, kernel choices (`SDPA_KERNELS`):
- "default": torch's own order (on CUDA: flash, efficient, math, cuDNN last);
- "cudnn", "flash", "efficient", "math": that kernel first, the others after it as fallbacks;
- "fa3", "fa4": flash first, with torch's flash kernel switched to FlashAttention-3 / -4
  (`torch.nn.attention.activate_flash_attention_impl`; CUDA only, needs the flash-attn-3 / flash-attn-4 package).

Packed (packing model) `packed_attention`, never with an N x N mask, backends (`BACKENDS`):
- "sdpa": one scaled_dot_product_attention call per sample, on the kernel chosen as above (any device, dtype);
- "varlen": torch.nn.attention.varlen.varlen_attn (CUDA, fp16 / bf16, torch >= 2.10);
- "nested": SDPA on a jagged nested tensor (CUDA, fp16 / bf16);
- "flash_attn": flash-attn's flash_attn_varlen_func, when that package is installed (CUDA, fp16 / bf16);
- "flash_attn_4": FlashAttention-4's `flash_attn.cute.flash_attn_varlen_func` (flash-attn-4, CUDA, fp16 / bf16);
- "flex": torch's FlexAttention with a block-diagonal block mask (any device; compiled on CUDA, eager and slow
  elsewhere);
- "eager": softmax(q k^T) v per sample, written out (the product's "eager").
The product runs "sdpa" with cuDNN first on CUDA in half precision (`vitparity.models.packed_attention`), the
choice these measurements made (docs/benchmarks.md); flash_attn_4, flex, fa3 and fa4 await a GPU measurement.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from functools import lru_cache
from unittest import mock

import torch

from vitparity.models import modeling_onevision_encoder, modeling_onevision_encoder_packing
from vitparity.models.packed_attention import PackedSegments, eager_attention, per_sample

BACKENDS = ("sdpa", "varlen", "nested", "flash_attn", "flash_attn_4", "flex", "eager")
SDPA_KERNELS = ("default", "cudnn", "flash", "efficient", "math", "fa3", "fa4")
# dense variants by transformers' attn_implementation name -> packed backend of that kernel
DENSE_IMPLEMENTATIONS = {"eager": "eager", "flex_attention": "flex", "flash_attention_2": "flash_attn",
                         "flash_attention_4": "flash_attn_4"}
_CUDA_HALF_ONLY = ("varlen", "nested", "flash_attn", "flash_attn_4")


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


def _has_flash_attn_4() -> bool:
    return _has_flash_attn() and _has_module("flash_attn.cute")


def _has_flex() -> bool:
    return _has_module("torch.nn.attention.flex_attention")


def _torch_flash_impls() -> tuple[str, ...]:
    """torch's switchable flash kernels (e.g. ("FA3", "FA4") in torch 2.14), () in a torch without the switch."""
    import torch.nn.attention as attention

    lister = getattr(attention, "list_flash_attention_impls", None)
    return tuple(lister()) if lister is not None else ()


@lru_cache(maxsize=None)
def _accepts_scale(func) -> bool:
    import inspect

    try:
        return "scale" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True


def _fast_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def check_sdpa_kernel(kernel: str, q: torch.Tensor) -> str:
    """`kernel` when it can run on tensors like `q`; ValueError otherwise."""
    if kernel not in SDPA_KERNELS:
        raise ValueError(f"unknown SDPA kernel {kernel!r}; choose one of {SDPA_KERNELS}")
    if kernel in ("fa3", "fa4"):
        if not _fast_cuda(q):
            raise ValueError(f"SDPA kernel {kernel!r} needs a CUDA tensor in float16 / bfloat16")
        if kernel.upper() not in _torch_flash_impls():
            raise ValueError(f"SDPA kernel {kernel!r}: torch {torch.__version__} has no {kernel.upper()} flash kernel")
    return kernel


def _use_torch_flash_impl(impl: str | None) -> None:
    """Route SDPA's flash kernel to torch's `impl` ("FA3" / "FA4"), or back to its built-in FA2 for None.

    The switch is process-wide (torch's dispatcher); it is changed only when it differs from what is asked.
    """
    import torch.nn.attention as attention

    if not hasattr(attention, "current_flash_attention_impl"):
        return
    if attention.current_flash_attention_impl() == impl:
        return
    if impl is None:
        attention.restore_flash_attention_impl()
    else:
        attention.activate_flash_attention_impl(impl)


def _sdpa_context(kernel: str):
    """A context that makes SDPA try `kernel` first (fallbacks after it); a no-op for "default"."""
    if kernel == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = names["flash" if kernel in ("fa3", "fa4") else kernel]
    order = [first] + [b for b in names.values() if b != first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: restrict to the chosen kernel and the math fallback
        return sdpa_kernel([order[0], order[-1]] if kernel != "math" else [order[0]])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   kernel: str = "default") -> torch.Tensor:
    """Bidirectional attention of (B, H, N, head_dim) tensors on the chosen SDPA kernel."""
    chosen = check_sdpa_kernel(kernel, q)
    if chosen in ("flash", "fa3", "fa4") and q.is_cuda:
        _use_torch_flash_impl(chosen.upper() if chosen != "flash" else None)
    with _sdpa_context(chosen):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _flex_function(device: torch.device):
    """torch's flex_attention, compiled on CUDA (fused kernel), as is elsewhere (unfused, for checks only).

    Compiled with dynamic shapes: every pack has its own token count, and a static compile recompiles per count
    until dynamo's recompile limit (8), after which flex_attention runs unfused and materialises the N x N scores
    (measured on an H200, 2026-12-04: the 9th shape, 84,392 tokens, asked for 424 GiB).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=True)
    return _FLEX["compiled"]


_FLEX: dict[str, object] = {}


def _flex_call(q, k, v, scale: float, block_mask=None) -> torch.Tensor:
    """flex_attention on (B, H, N, head_dim) tensors (the CPU path warns that it is unfused: expected there)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_function(q.device)(q, k, v, block_mask=block_mask, scale=scale)


@lru_cache(maxsize=8)
def _document_block_mask(lengths: tuple[int, ...], device: torch.device):
    """FlexAttention block mask letting token i attend to token j only inside the same sample."""
    from torch.nn.attention.flex_attention import create_block_mask

    sample = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    n = sum(lengths)

    def same_sample(b, h, q_idx, kv_idx):
        return sample[q_idx] == sample[kv_idx]

    return create_block_mask(same_sample, None, None, n, n, device=device)


def _flash_attn_2():
    import flash_attn

    return flash_attn


def _flash_attn_4_module():
    from flash_attn import cute

    return cute


def _first(out):
    """flash-attn-4 returns (out, lse); flash-attn 2 returns out."""
    return out[0] if isinstance(out, tuple) else out


def dense_attention(q, k, v, scale: float, choice: str = "default") -> torch.Tensor:
    """Bidirectional attention of (B, H, N, head_dim) tensors: an SDPA kernel (`SDPA_KERNELS`) or an
    attn_implementation name (`DENSE_IMPLEMENTATIONS`)."""
    backend = DENSE_IMPLEMENTATIONS.get(choice)
    if backend is None:
        return sdpa_attention(q, k, v, scale, choice)
    check_backend(backend, q)
    if backend == "eager":
        return eager_attention(q, k, v, scale)
    if backend == "flex":
        return _flex_call(q, k, v, scale)
    func = _flash_attn_4_module().flash_attn_func if backend == "flash_attn_4" else _flash_attn_2().flash_attn_func
    out = _first(func(*(x.transpose(1, 2) for x in (q, k, v)), softmax_scale=scale, causal=False))
    return out.transpose(1, 2)


def available_backends(device: torch.device | str, dtype: torch.dtype) -> tuple[str, ...]:
    """Packed backends that can run on tensors of this device and dtype in this environment."""
    cuda_half = torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    found = []
    for name in BACKENDS:
        try:
            _check(name, cuda_half)
        except ValueError:
            continue
        found.append(name)
    return tuple(found)


def available_sdpa_kernels(device: torch.device | str, dtype: torch.dtype) -> tuple[str, ...]:
    """SDPA kernel preferences that are meaningful on this device and dtype."""
    if torch.device(device).type != "cuda":
        return ("default", "math")
    kernels = ["default", "cudnn", "flash", "efficient", "math"]
    if dtype in (torch.float16, torch.bfloat16):
        kernels += [name.lower() for name in _torch_flash_impls() if name in ("FA3", "FA4")]
    return tuple(kernels)


def _check(backend: str, cuda_half: bool) -> None:
    """Raise ValueError when `backend` cannot run here on tensors that are (or are not) CUDA fp16 / bf16."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {backend!r}; choose one of {BACKENDS}")
    if backend in _CUDA_HALF_ONLY and not cuda_half:
        raise ValueError(f"packed attention backend {backend!r} needs a CUDA tensor in float16 / bfloat16")
    if backend == "flash_attn" and not _has_flash_attn():
        raise ValueError("packed attention backend 'flash_attn' needs the flash-attn package, which is not installed")
    if backend == "flash_attn_4" and not _has_flash_attn_4():
        raise ValueError("packed attention backend 'flash_attn_4' needs flash_attn.cute (pip install -e '.[gpu]')")
    if backend == "varlen" and not _has_varlen():
        raise ValueError(f"packed attention backend 'varlen' needs torch.nn.attention.varlen (torch {torch.__version__})")
    if backend == "flex" and not _has_flex():
        raise ValueError(f"packed attention backend 'flex' needs torch.nn.attention.flex_attention (torch {torch.__version__})")


def check_backend(backend: str, q: torch.Tensor) -> str:
    """`backend` when it can run on tensors like `q`; ValueError otherwise."""
    _check(backend, _fast_cuda(q))
    return backend


def _nested_sdpa(q, k, v, segments: PackedSegments, scale: float, kernel: str) -> torch.Tensor:
    offsets = segments.cu_seqlens.to(torch.int64)

    def jagged(x: torch.Tensor) -> torch.Tensor:
        nt = torch.nested.nested_tensor_from_jagged(
            x, offsets, min_seqlen=segments.min_length, max_seqlen=segments.max_length
        )
        return nt.transpose(1, 2)  # (S, H, j, head_dim)

    out = sdpa_attention(jagged(q), jagged(k), jagged(v), scale, kernel)
    return out.transpose(1, 2).values()


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, scale: float,
                     backend: str = "sdpa", sdpa_kernel: str = "default") -> torch.Tensor:
    """q, k, v (N, H, head_dim) -> (N, H, head_dim) on `backend`; token i attends only to tokens of its sample."""
    chosen = check_backend(backend, q)
    m = segments.max_length
    if chosen == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, segments.cu_seqlens, segments.cu_seqlens, m, m, softmax_scale=scale)
    if chosen == "flash_attn_4":
        cu = segments.cu_seqlens
        out = _flash_attn_4_module().flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, softmax_scale=scale, causal=False
        )
        return _first(out)
    if chosen == "flex":
        block_mask = _document_block_mask(segments.lengths, q.device) if len(segments.lengths) > 1 else None
        out = _flex_call(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), scale, block_mask)
        return out[0].transpose(0, 1)
    if chosen == "eager":
        return per_sample(q, k, v, segments, lambda a, b, c: eager_attention(a, b, c, scale))
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
    return per_sample(q, k, v, segments, lambda a, b, c: sdpa_attention(a, b, c, scale, sdpa_kernel))


@contextlib.contextmanager
def attention_variant(hf: str | None = None, packing: tuple[str, str] | None = None) -> Iterator[None]:
    """Inside the block, the non-packing model's attention runs `hf` (a `dense_attention` choice) and the packing
    model's runs `packing` ((backend, SDPA kernel) of `packed_attention`); None keeps the product's. A choice that
    cannot run on the models' tensors raises ValueError at their first attention call."""
    with contextlib.ExitStack() as stack:
        if hf is not None:
            stack.enter_context(mock.patch.object(
                modeling_onevision_encoder, "dense_attention",
                lambda q, k, v, scale, implementation="sdpa": dense_attention(q, k, v, scale, hf)))
        if packing is not None:
            backend, kernel = packing
            stack.enter_context(mock.patch.object(
                modeling_onevision_encoder_packing, "packed_attention",
                lambda q, k, v, segments, scale, implementation="sdpa": packed_attention(
                    q, k, v, segments, scale, backend, kernel)))
        yield
