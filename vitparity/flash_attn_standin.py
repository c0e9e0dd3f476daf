"""A stand-in for flash-attn's two attention functions, for a checkpoint's own code on a machine without flash-attn.

The release's packing modeling file imports `flash_attn_varlen_func` (and its non-packing file may import
`flash_attn_func`) when it is imported, so on a machine without flash-attn (every CPU machine) the checkpoint's own
code cannot even be imported. `standin_installed()` puts a module named `flash_attn` holding the two functions below
into `sys.modules` for the duration of that import only (the importing module keeps the functions it bound; nothing
else in the process sees the name afterwards), and only when the real package cannot be imported: the real
flash-attn is never replaced. For as long, whatever the code asks about flash-attn answers that it is there:
`importlib.util.find_spec("flash_attn")` (the module's spec), the package metadata (`importlib.metadata.version`
gives `VERSION`, through a distribution finder on `sys.meta_path`) and transformers' `is_flash_attn_2_available` /
`is_flash_attn_greater_or_equal*` (a release file that raises ImportError when they say no imports as published).
Each is restored afterwards; a file that bound one of transformers' functions keeps a wrapper that asks the original.

Same signatures and contract as flash-attn 2:
- `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
  softmax_scale=None, causal=False, ...)`: q (total_q, H, D), k and v (total_k, H_kv, D) with H a multiple of H_kv;
  `cu_seqlens_*` (S + 1,) int32 offsets of the S segments; token i of segment s attends only to the keys of
  segment s; returns (total_q, H, D) in q's dtype;
- `flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)`: q (B, S_q, H, D), k and v
  (B, S_k, H_kv, D); returns (B, S_q, H, D).
`softmax_scale` None means D ** -0.5; `causal` masks as flash-attn >= 2.1 does (aligned to the bottom-right corner
when a segment has more keys than queries); `dropout_p` drops attention weights (pass 0.0 in eval, as the models
do).

The stand-in holds flash-attn 2's contract, so that code which fails on a GPU does not pass on a CPU: what flash-attn
refuses (its checks in `csrc/flash_attn/flash_api.cpp`, `mha_fwd` and `mha_varlen_fwd`, and the Python wrapper
`flash_attn/flash_attn_interface.py`, read at the flash-attention repository of 2026-08) or computes wrongly, the
stand-in refuses with `FlashAttnContractError`, naming the argument:
- q, k, v of the same dtype, float16 or bfloat16 (float32 is served: a CPU run in float32 checks the maths; on a GPU
  flash-attn refuses it, and the code record says the stand-in served it);
- q (total_q, H, D) / (B, S_q, H, D), k and v (total_k, H_kv, D) / (B, S_k, H_kv, D): the same head size D, H a
  multiple of H_kv; D, padded by the wrapper to a multiple of 8, at most 256; at least one sequence;
- `cu_seqlens_q` / `cu_seqlens_k`: 1-D, contiguous, int32, one offset more than there are segments, rising from 0 to
  the packed length (flash-attn does not check the values: wrong ones compute garbage, so they are refused here);
- `max_seqlen_q` / `max_seqlen_k` at least the longest segment (flash-attn sizes its grid by them and leaves the
  rest of a longer segment uncomputed);
- the tensors on one device. A last dimension with a stride other than 1 is taken (the wrapper makes it contiguous). Non-causal attention without dropout on equal query and key segments runs on the project's packed-attention
backends (`vitparity.models.packed_attention.packed_attention`, backend "auto"); the other cases run one SDPA call
per segment with an explicit mask. Options the stand-in cannot serve (sliding windows, softcap, ALiBi, returned
attention probabilities, paged KV) raise `StandInUnsupported`, naming the missing kernel and the ways on.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import sys
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .models.packed_attention import PackedSegments, packed_attention

MODULE_NAME = "flash_attn"
# Also importable under flash-attn's own submodule, which some code imports from.
SUBMODULES = ("flash_attn.flash_attn_interface",)
VERSION = "2.8.4"  # the flash-attn release whose contract the stand-in holds (flash_attn/__init__.py at 2026-08)
DESCRIPTION = (f"vitparity.flash_attn_standin (flash-attn is not importable here; flash-attn {VERSION}'s contract, "
               "float32 served)")
# transformers' questions about flash-attn 2, answered yes while the stand-in is installed
TRANSFORMERS_QUERIES = ("is_flash_attn_2_available", "is_flash_attn_greater_or_equal_2_10",
                        "is_flash_attn_greater_or_equal")
WAYS_ON = ("install flash-attn on a CUDA machine and run there, or check the weights with vitparity's own classes "
           "(--own-classes)")


class StandInUnsupported(NotImplementedError):
    """The checkpoint's code asked the stand-in for a flash-attn feature it does not provide."""


class FlashAttnContractError(ValueError):
    """The checkpoint's code called flash-attn in a way flash-attn refuses or computes wrongly; names the argument."""


MAX_HEAD_DIM = 256  # flash_api.cpp: "FlashAttention forward only supports head dimension at most 256"
HALF_DTYPES = (torch.float16, torch.bfloat16)  # flash_api.cpp: "FlashAttention only support fp16 and bf16 data type"


def _breach(function: str, argument: str, what: str) -> None:
    raise FlashAttnContractError(f"{function}: {argument} {what}; flash-attn refuses this or computes it wrongly on a "
                                 "GPU, so its stand-in refuses it too")


def _check_tensors(function: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int) -> None:
    """flash-attn's checks of q, k and v: rank, dtype, head size, heads, device (see the module docstring)."""
    layout = "(total, heads, head_dim)" if dims == 3 else "(batch, seqlen, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            _breach(function, name, f"must be a {dims}-D tensor {layout}, got "
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if q.dtype not in (*HALF_DTYPES, torch.float32):
        _breach(function, "q", f"has dtype {q.dtype}; flash-attn takes float16 or bfloat16")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            _breach(function, name, f"has dtype {x.dtype}, q {q.dtype}: query, key and value must have the same dtype")
        if x.device != q.device:
            _breach(function, name, f"is on {x.device}, q on {q.device}")
    head_dim = q.shape[-1]
    padded = head_dim + (-head_dim) % 8
    if padded > MAX_HEAD_DIM:
        _breach(function, "q", f"has head size {head_dim} (padded to {padded}); flash-attn supports at most "
                f"{MAX_HEAD_DIM}")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        _breach(function, "k, v", f"head sizes {k.shape[-1]} and {v.shape[-1]} must equal q's {head_dim}")
    if k.shape[:-1] != v.shape[:-1]:
        _breach(function, "v", f"shape {tuple(v.shape)} must equal k's {tuple(k.shape)}")
    if dims == 4 and (k.shape[0] != q.shape[0] or q.shape[0] == 0):
        _breach(function, "k", f"batch {k.shape[0]} must equal q's {q.shape[0]}, at least 1")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        _breach(function, "k", f"has {kv_heads} heads; the number of key/value heads must divide q's {heads}")


def _check_offsets(function: str, name: str, cu_seqlens, total: int, device: torch.device) -> list[int]:
    """flash-attn's checks of one `cu_seqlens_*`, and its values (S + 1 offsets rising from 0 to `total`)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        _breach(function, name, f"must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        _breach(function, name, f"must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or not cu_seqlens.is_contiguous():
        _breach(function, name, f"must be a contiguous 1-D tensor, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        _breach(function, name, f"is on {cu_seqlens.device}, q on {device}")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        _breach(function, name, f"{offsets} must rise from 0 to the {total} packed tokens")
    return offsets


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
    function = "flash_attn_varlen_func"
    _check_tensors(function, q, k, v, dims=3)
    q_offsets = _check_offsets(function, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    k_offsets = _check_offsets(function, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(q_offsets) != len(k_offsets):
        _breach(function, "cu_seqlens_k", f"has {len(k_offsets) - 1} segments, cu_seqlens_q {len(q_offsets) - 1}")
    lengths = [b - a for a, b in zip(q_offsets, q_offsets[1:])]
    for name, offsets, limit in (("max_seqlen_q", q_offsets, max_seqlen_q), ("max_seqlen_k", k_offsets, max_seqlen_k)):
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        if int(limit) < longest:
            _breach(function, name, f"={int(limit)} is below the longest segment ({longest} tokens)")
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
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
    _check_tensors("flash_attn_func", q, k, v, dims=4)
    batch, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]

    def offsets(n: int) -> torch.Tensor:
        return torch.arange(0, (batch + 1) * n, n, dtype=torch.int32, device=q.device)

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
    """A fresh module object named `flash_attn` exposing the two functions (and `__standin__ = True`), with a spec so
    that `importlib.util.find_spec` finds it while it is in `sys.modules`."""
    module = types.ModuleType(MODULE_NAME, __doc__)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_func = flash_attn_func
    module.__standin__ = True
    module.__version__ = VERSION
    module.__spec__ = importlib.machinery.ModuleSpec(MODULE_NAME, None, is_package=True)
    module.__path__ = []
    return module


class _StandInDistribution(importlib.metadata.Distribution):
    """The package metadata of `flash-attn` as the stand-in answers it (name and `VERSION`)."""

    def read_text(self, filename: str) -> str | None:
        return f"Metadata-Version: 2.1\nName: flash-attn\nVersion: {VERSION}\n" if filename == "METADATA" else None

    def locate_file(self, path):
        return None


class _StandInMetadataFinder:
    """A `sys.meta_path` entry that finds no module and one distribution: flash-attn (or flash_attn)."""

    def find_spec(self, *args, **kwargs) -> None:
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name is not None and context.name.replace("_", "-").lower() == "flash-attn":
            yield _StandInDistribution()


_answering = False  # True while the stand-in is installed: transformers' flash-attn queries answer yes


def _answer_yes(original: Callable[..., bool]) -> Callable[..., bool]:
    """transformers' query `original`, answering True while the stand-in is installed and asking `original` else."""
    if getattr(original, "__wrapped_by_standin__", False):
        return original

    def query(*args, **kwargs) -> bool:
        return True if _answering else original(*args, **kwargs)

    query.__wrapped_by_standin__ = True
    query.__wrapped__ = original
    query.__name__ = getattr(original, "__name__", "query")
    return query


@contextlib.contextmanager
def _transformers_answering_yes() -> Iterator[None]:
    """transformers' flash-attn queries (`TRANSFORMERS_QUERIES`, in `transformers.utils` and its `import_utils`)
    answer yes for the duration of the block; the originals are put back afterwards."""
    global _answering
    from transformers import utils
    from transformers.utils import import_utils

    saved = [(module, name, getattr(module, name)) for module in (utils, import_utils) for name in TRANSFORMERS_QUERIES
             if hasattr(module, name)]
    for module, name, original in saved:
        setattr(module, name, _answer_yes(original))
    _answering = True
    try:
        yield
    finally:
        _answering = False
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def standin_installed() -> Iterator[bool]:
    """While the block runs, `import flash_attn` gives the stand-in when the real package cannot be imported, and
    every question about flash-attn (spec, metadata, transformers' availability checks) answers that it is there;
    yields whether the stand-in is installed. `sys.modules`, `sys.meta_path` and transformers are restored
    afterwards."""
    if real_flash_attn_importable():
        yield False
        return
    names = (MODULE_NAME, *SUBMODULES)
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    module = standin_module()
    finder = _StandInMetadataFinder()
    for name in names:
        sys.modules[name] = module
    sys.meta_path.append(finder)
    try:
        with _transformers_answering_yes():
            yield True
    finally:
        sys.meta_path.remove(finder)
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
