"""Attention kernels of both encoders: dense SDPA on a chosen backend, and block-diagonal packed attention.

Dense (non-packing model) `sdpa_attention`, kernel choices (`SDPA_KERNELS`):
- "default": torch's own order (on CUDA: flash, efficient, math, cuDNN last);
- "cudnn", "flash", "efficient", "math": that kernel first, the others after it as fallbacks;
- "fa3", "fa4": flash first, with torch's flash kernel switched to FlashAttention-3 / -4
  (`torch.nn.attention.activate_flash_attention_impl`; CUDA only, needs the flash-attn-3 / flash-attn-4 package);
- "auto": `AUTO_SDPA_KERNEL` on CUDA in half precision (measured fastest, docs/benchmarks.md), "default" otherwise.

Packed (packing model) `packed_attention`, never with an N x N mask, backends (`BACKENDS`):
- "sdpa": one scaled_dot_product_attention call per sample, on the kernel chosen as above (any device, dtype);
- "varlen": torch.nn.attention.varlen.varlen_attn (CUDA, fp16 / bf16, torch >= 2.10);
- "nested": SDPA on a jagged nested tensor (CUDA, fp16 / bf16);
- "flash_attn": flash-attn's flash_attn_varlen_func, when that package is installed (CUDA, fp16 / bf16);
- "flash_attn_4": FlashAttention-4's `flash_attn.cute.flash_attn_varlen_func` (flash-attn-4, CUDA, fp16 / bf16);
- "flex": torch's FlexAttention with a block-diagonal block mask (any device; compiled on CUDA, eager and slow
  elsewhere);
- "eager": softmax(q k^T) v per sample, written out (transformers' "eager"; float32 softmax);
- "auto": `AUTO_PACKED_BACKEND` on CUDA in half precision, "sdpa" otherwise. flash_attn runs only when named:
  it was not measured, and torch's own FA2 kernel ran slower than cuDNN at head_dim 64 (docs/benchmarks.md).
  flash_attn_4, flex, fa3 and fa4 await a GPU measurement before "auto" may choose them.

The models also follow transformers' `config._attn_implementation` (`ATTN_IMPLEMENTATIONS`): "sdpa" (the default)
uses the knobs above, the other names pick the matching kernel (`model_backend`, `dense_attention`).

Nothing here reads a device tensor back to the host: sample lengths live on the host (`PackedSegments`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "varlen", "nested", "flash_attn", "flash_attn_4", "flex", "eager")
SDPA_KERNELS = ("auto", "default", "cudnn", "flash", "efficient", "math", "fa3", "fa4")
# transformers' attn_implementation name -> packed backend of that kernel (None: the model's own knobs)
ATTN_IMPLEMENTATIONS = {
    "eager": "eager",
    "sdpa": None,
    "flex_attention": "flex",
    "flash_attention_2": "flash_attn",
    "flash_attention_4": "flash_attn_4",
}
_CUDA_HALF_ONLY = ("varlen", "nested", "flash_attn", "flash_attn_4")


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


def resolve_sdpa_kernel(kernel: str, q: torch.Tensor) -> str:
    """The SDPA kernel preference that will be used for this query tensor."""
    if kernel not in SDPA_KERNELS:
        raise ValueError(f"unknown SDPA kernel {kernel!r}; choose one of {SDPA_KERNELS}")
    if kernel == "auto":
        return AUTO_SDPA_KERNEL if _fast_cuda(q) else "default"
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


def _sdpa_order(kernel: str) -> list:
    from torch.nn.attention import SDPBackend

    names = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    first = names["flash" if kernel in ("fa3", "fa4") else kernel]
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
    if chosen in ("flash", "fa3", "fa4") and q.is_cuda:
        _use_torch_flash_impl(chosen.upper() if chosen != "flash" else None)
    with _sdpa_context(chosen, q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v of (..., N, head_dim) tensors, the softmax in float32 (transformers' "eager")."""
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(weights.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)


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


def _flash_attn_4_module():
    from flash_attn import cute

    return cute


def _first(out):
    """flash-attn-4 returns (out, lse); flash-attn 2 returns out."""
    return out[0] if isinstance(out, tuple) else out


def dense_attention(q, k, v, scale: float, implementation: str = "sdpa", kernel: str = "auto") -> torch.Tensor:
    """Bidirectional attention of (B, H, N, head_dim) tensors by transformers' attn_implementation name."""
    backend = model_backend(implementation, "auto", q)
    if backend == "eager":
        return eager_attention(q, k, v, scale)
    if backend == "flex":
        return _flex_call(q, k, v, scale)
    if backend in ("flash_attn", "flash_attn_4"):
        func = _flash_attn_4_module().flash_attn_func if backend == "flash_attn_4" else _flash_attn_2().flash_attn_func
        out = _first(func(*(x.transpose(1, 2) for x in (q, k, v)), softmax_scale=scale, causal=False))
        return out.transpose(1, 2)
    return sdpa_attention(q, k, v, scale, kernel)


def _flash_attn_2():
    import flash_attn

    return flash_attn


def model_backend(implementation: str, backend: str, q: torch.Tensor) -> str:
    """The packed backend for a model whose config says `implementation` and whose knob says `backend`.

    "sdpa" (transformers' default) leaves the choice to the knob; any other implementation picks its own kernel,
    and a knob set to a different backend at the same time is refused.
    """
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {implementation!r} is not supported by these models; use one of "
            f"{tuple(ATTN_IMPLEMENTATIONS)}"
        )
    wanted = ATTN_IMPLEMENTATIONS[implementation]
    if wanted is None:
        return resolve_backend(backend, q)
    if backend not in ("auto", wanted):
        raise ValueError(
            f"attn_implementation {implementation!r} runs backend {wanted!r}, but packed_attention_backend is "
            f"{backend!r}; set attn_implementation 'sdpa' to choose the backend by name"
        )
    return resolve_backend(wanted, q)


def packed_backend_of(model: torch.nn.Module, q: torch.Tensor) -> str | None:
    """The packed backend a loaded packing model runs for tensors like `q`, from its config's attn_implementation
    and its `packed_attention_backend` knob; None for a model without the knob (remote code)."""
    backend = getattr(model, "packed_attention_backend", None)
    if backend is None:
        return None
    return model_backend(getattr(model.config, "_attn_implementation", None) or "sdpa", backend, q)


def available_backends(device: torch.device | str, dtype: torch.dtype) -> tuple[str, ...]:
    """Packed backends (not "auto") that can run on tensors of this device and dtype in this environment."""
    found = []
    cuda_half = torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    for name in BACKENDS[1:]:
        try:
            _check_backend(name, cuda_half)
        except ValueError:
            continue
        found.append(name)
    return tuple(found)


def available_sdpa_kernels(device: torch.device | str, dtype: torch.dtype) -> tuple[str, ...]:
    """SDPA kernel preferences (not "auto") that are meaningful on this device and dtype."""
    device = torch.device(device)
    if device.type != "cuda":
        return ("default", "math")
    kernels = ["default", "cudnn", "flash", "efficient", "math"]
    if dtype in (torch.float16, torch.bfloat16):
        kernels += [name.lower() for name in _torch_flash_impls() if name in ("FA3", "FA4")]
    return tuple(kernels)


def _check_backend(backend: str, cuda_half: bool) -> None:
    """Raise ValueError when `backend` cannot run here on tensors that are (or are not) CUDA fp16 / bf16."""
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


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The packed attention backend that will run for this query tensor."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown packed attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        _check_backend(backend, _fast_cuda(q))
        return backend
    if _fast_cuda(q):
        if AUTO_PACKED_BACKEND == "varlen" and not _has_varlen():
            return "sdpa"
        return AUTO_PACKED_BACKEND
    return "sdpa"


def _per_sample(q, k, v, segments: PackedSegments, attend) -> torch.Tensor:
    """`attend` once per sample on (1, H, n, head_dim) views of the packed tensors."""

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
        return _per_sample(q, k, v, segments, lambda a, b, c: eager_attention(a, b, c, scale))
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
    return _per_sample(q, k, v, segments, lambda a, b, c: sdpa_attention(a, b, c, scale, sdpa_kernel))
