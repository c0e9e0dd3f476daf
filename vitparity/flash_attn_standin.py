"""A stand-in for flash-attn's two attention functions, for a checkpoint's own code on a machine without flash-attn.

The release's packing modeling file imports `flash_attn_varlen_func` (and its non-packing file may import
`flash_attn_func`) when it is imported, so on a machine without flash-attn (every CPU machine) the checkpoint's own
code cannot even be imported. `standin_installed()` puts a module named `flash_attn` holding the two functions below
into `sys.modules` for the duration of that import only (the importing module keeps the functions it bound; nothing
else in the process sees the name afterwards), and only when the real package cannot be imported: the real
flash-attn is never replaced.

Same signatures and contract as flash-attn 2:
- `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
  softmax_scale=None, causal=False, ...)`: q (total_q, H, D), k and v (total_k, H_kv, D) with H a multiple of H_kv;
  `cu_seqlens_*` (S + 1,) int32 offsets of the S segments; token i of segment s attends only to the keys of
  segment s; returns (total_q, H, D) in q's dtype;
- `flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)`: q (B, S_q, H, D), k and v
  (B, S_k, H_kv, D); returns (B, S_q, H, D).
`softmax_scale` None means D ** -0.5; `causal` masks as flash-attn >= 2.1 does (aligned to the bottom-right corner
when a segment has more keys than queries); `dropout_p` drops attention weights (pass 0.0 in eval, as the models
do). Non-causal attention without dropout on equal query and key segments runs on the project's packed-attention
backends (`vitparity.models.packed_attention.packed_attention`, backend "auto"); the other cases run one SDPA call
per segment with an explicit mask. Options the stand-in cannot serve (sliding windows, softcap, ALiBi, returned
attention probabilities, paged KV) raise `StandInUnsupported`, naming the missing kernel and the ways on.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .models.packed_attention import PackedSegments, packed_attention

MODULE_NAME = "flash_attn"
# Also importable under flash-attn's own submodule, which some code imports from.
SUBMODULES = ("flash_attn.flash_attn_interface",)
DESCRIPTION = "vitparity.flash_attn_standin (flash-attn is not importable here)"
WAYS_ON = ("install flash-attn on a CUDA machine and run there, or check the weights with vitparity's own classes "
           "(--own-classes)")


class StandInUnsupported(NotImplementedError):
    """The checkpoint's code asked the stand-in for a flash-attn feature it does not provide."""


def _refuse(function: str, option: str, value) -> None:
    raise StandInUnsupported(
        f"flash-attn is not importable here and its stand-in cannot serve {function}({option}={value!r}): the "
        f"missing kernel is flash_attn.{function} with {option}; {WAYS_ON}"
    )


def _check_unsupported(function: str, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                       return_attn_probs=False, block_table=None, **others) -> None:
    if tuple(window_size) != (-1, -1):
        _refuse(function, "window_size", window_size)
    if softcap:
        _refuse(function, "softcap", softcap)
    if alibi_slopes is not None:
        _refuse(function, "alibi_slopes", "<tensor>")
    if return_attn_probs:
        _refuse(function, "return_attn_probs", return_attn_probs)
    if block_table is not None:
        _refuse(function, "block_table", "<tensor>")
    unknown = sorted(key for key in others if key != "deterministic")
    if unknown:
        _refuse(function, unknown[0], others[unknown[0]])


def _offsets(cu_seqlens: torch.Tensor, total: int, name: str) -> list[int]:
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} {offsets}: must rise from 0 to the {total} packed tokens")
    return offsets


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                       dropout_p: float) -> torch.Tensor:
    """One segment: q (n_q, H, D), k and v (n_k, H, D) -> (n_q, H, D), with the causal mask and dropout."""
    n_q, n_k = q.shape[0], k.shape[0]
    mask = None
    if causal:  # bottom-right aligned, as flash-attn >= 2.1: query i sees keys j <= i + n_k - n_q
        rows = torch.arange(n_q, device=q.device)[:, None]
        cols = torch.arange(n_k, device=q.device)[None, :]
        mask = cols <= rows + (n_k - n_q)
    heads = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*heads, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if causal:  # a query row that sees no key: flash-attn returns zeros there, SDPA NaN
        out = out.masked_fill(~mask.any(dim=-1)[None, None, :, None], 0.0)
    return out[0].transpose(0, 1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, **others):
    """Attention of packed segments (see the module docstring): (total_q, H, D) -> (total_q, H, D)."""
    _check_unsupported("flash_attn_varlen_func", window_size, softcap, alibi_slopes, return_attn_probs, block_table,
                       **others)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (total, heads, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads or v.shape[1] != kv_heads:
        raise ValueError(f"{heads} query heads need a divisor as key/value heads, got {kv_heads} and {v.shape[1]}")
    if kv_heads != heads:
        k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q_offsets = _offsets(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    k_offsets = _offsets(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(q_offsets) != len(k_offsets):
        raise ValueError(f"cu_seqlens_q has {len(q_offsets) - 1} segments, cu_seqlens_k {len(k_offsets) - 1}")
    lengths = [b - a for a, b in zip(q_offsets, q_offsets[1:])]
    if max(lengths) > int(max_seqlen_q) or max(b - a for a, b in zip(k_offsets, k_offsets[1:])) > int(max_seqlen_k):
        raise ValueError(f"a segment is longer than max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k}")
    if not causal and not dropout_p and q_offsets == k_offsets and min(lengths) > 0:
        segments = PackedSegments.from_lengths(lengths, q.device)
        return packed_attention(q, k, v, segments, scale)
    out = q.new_zeros(q.shape)
    for (qa, qb), (ka, kb) in zip(zip(q_offsets, q_offsets[1:]), zip(k_offsets, k_offsets[1:])):
        if qb > qa and kb > ka:
            out[qa:qb] = _segment_attention(q[qa:qb], k[ka:kb], v[ka:kb], scale, causal, dropout_p)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, **others):
    """Batched attention (see the module docstring): (B, S_q, H, D) -> (B, S_q, H, D)."""
    _check_unsupported("flash_attn_func", window_size, softcap, alibi_slopes, return_attn_probs, None, **others)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, seqlen, heads, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]

    def offsets(n: int) -> torch.Tensor:
        return torch.arange(0, (batch + 1) * n, n, dtype=torch.int32)

    out = flash_attn_varlen_func(q.reshape(batch * n_q, *q.shape[2:]), k.reshape(batch * n_k, *k.shape[2:]),
                                 v.reshape(batch * n_k, *v.shape[2:]), offsets(n_q), offsets(n_k), n_q, n_k,
                                 dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)
    return out.reshape(q.shape)


def real_flash_attn_importable() -> bool:
    """Whether the real flash-attn package imports here (then the stand-in is never used)."""
    if isinstance(sys.modules.get(MODULE_NAME), types.ModuleType) and getattr(
            sys.modules[MODULE_NAME], "__standin__", False):
        return False
    try:
        importlib.import_module(MODULE_NAME)
    except Exception:  # not installed, or installed without a usable CUDA build
        return False
    return True


def standin_module() -> types.ModuleType:
    """A fresh module object named `flash_attn` exposing the two functions (and `__standin__ = True`)."""
    module = types.ModuleType(MODULE_NAME, __doc__)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_func = flash_attn_func
    module.__standin__ = True
    module.__version__ = "stand-in"
    return module


@contextlib.contextmanager
def standin_installed() -> Iterator[bool]:
    """While the block runs, `import flash_attn` gives the stand-in when the real package cannot be imported;
    yields whether the stand-in is installed. `sys.modules` is restored afterwards."""
    if real_flash_attn_importable():
        yield False
        return
    names = (MODULE_NAME, *SUBMODULES)
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    module = standin_module()
    for name in names:
        sys.modules[name] = module
    try:
        yield True
    finally:
        for name in names:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)


def uses_standin(module: types.ModuleType) -> bool:
    """Whether a module imported while the stand-in was installed bound it (its functions or the module)."""
    return any(value is flash_attn_varlen_func or value is flash_attn_func
               or getattr(value, "__standin__", False) is True
               for value in vars(module).values())
