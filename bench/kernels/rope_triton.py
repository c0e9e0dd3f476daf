"""One-pass RoPE for CUDA tensors, written in Triton: read x once, write the rotated x once.

Same maths as `layers.apply_rope_reference`: out = x * cos + rotate(x) * sin with rotate(x0, x1, ...) =
(-x1, x0, ...), computed in float32 and stored in x's dtype. Each program takes a block of tokens, loads
their cos / sin rows once and rotates every head of those tokens (the tables are not re-read per head).
Imported only for CUDA tensors by `bench.kernels.rope`, which falls back to the product's torch RoPE where
this cannot run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_tokens", "n_heads"])  # no recompilation per token count
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    n_tokens, n_heads,
    x_stride_t, x_stride_h, c_stride_t, s_stride_t, o_stride_t, o_stride_h,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, HEAD_DIM)
    mask = (t < n_tokens)[:, None]
    t64 = t.to(tl.int64)[:, None]
    cos = tl.load(cos_ptr + t64 * c_stride_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t64 * s_stride_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    # rotate pairs: element d takes its partner d ^ 1, negated at even d
    sin = sin * tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
    partner = (d ^ 1)[None, :]
    for h in range(n_heads):
        base = x_ptr + t64 * x_stride_t + h * x_stride_h
        x = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32)
        out = x * cos + xp * sin
        tl.store(out_ptr + t64 * o_stride_t + h * o_stride_h + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def supported(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """x (T, H, D) and cos (T, D) that the kernel handles."""
    d = x.shape[-1]
    return (
        x.dim() == 3 and cos.dim() == 2 and cos.shape == (x.shape[0], d)
        and d >= 2 and (d & (d - 1)) == 0
        and x.stride(-1) == 1 and cos.stride(-1) == 1
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and cos.dtype == torch.float32
    )


def rope_thd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) (any token / head strides, unit last stride); cos, sin (T, D) float32 -> contiguous (T, H, D)."""
    n_tokens, n_heads, head_dim = x.shape
    out = torch.empty((n_tokens, n_heads, head_dim), dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return out
    block_t = 32 if head_dim <= 64 else 16
    grid = (triton.cdiv(n_tokens, block_t),)
    _rope_kernel[grid](
        x, cos, sin, out,
        n_tokens, n_heads,
        x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=block_t,
    )
    return out
