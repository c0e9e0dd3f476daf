"""The Triton RoPE variant of both encoders (`rope_triton`), measured by the benchmarks (never run by the gate).

`rope_variant("triton")` makes both models' RoPE one Triton pass on CUDA tensors inside a block (where Triton
imports and the layout fits; the product's torch RoPE otherwise); `rope_variant("torch")` keeps the product's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from unittest import mock

import torch

from vitparity.models import layers, modeling_onevision_encoder, modeling_onevision_encoder_packing

ROPE_IMPLS = ("torch", "triton")
_triton_state: dict[str, object] = {}


def _rope_triton_module():
    """The Triton RoPE module, or None when Triton is missing or failed once in this process."""
    if "module" not in _triton_state:
        try:
            from . import rope_triton
        except Exception as err:  # no triton, or one that cannot import here
            _triton_state["module"], _triton_state["error"] = None, err
        else:
            _triton_state["module"] = rope_triton
    return _triton_state["module"]


def rope_status(device: torch.device | str) -> dict[str, object]:
    """Which path `rope_variant("triton")` runs for tensors on `device` ("triton" or "torch"), and why Triton is
    off."""
    module = _rope_triton_module() if torch.device(device).type == "cuda" else None
    error = _triton_state.get("error")
    return {"path": "triton" if module is not None else "torch",
            "triton_error": None if error is None else f"{type(error).__name__}: {error}"}


def _apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """The Triton path for the two layouts the encoders use, or None to fall back.

    (N, H, D) with cos (N, 1, D) (packing), and (1, H, N, D) with cos (1, 1, N, D) (non-packing, batch 1).
    """
    if not x.is_cuda or cos.shape != sin.shape or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return None
    module = _rope_triton_module()
    if module is None:
        return None
    if x.dim() == 3 and cos.dim() == 3 and cos.shape[1] == 1:
        x_thd, c, s, restore = x, cos[:, 0], sin[:, 0], lambda out: out
    elif x.dim() == 4 and x.shape[0] == 1 and cos.dim() == 4 and cos.shape[:2] == (1, 1):
        x_thd, c, s, restore = x[0].transpose(0, 1), cos[0, 0], sin[0, 0], lambda out: out.transpose(0, 1)[None]
    else:
        return None
    if not module.supported(x_thd, c) or not module.supported(x_thd, s):
        return None
    try:
        return restore(module.rope_thd(x_thd, c, s))
    except Exception as err:  # a Triton that cannot compile here: use torch from now on, and say so once
        _triton_state["module"], _triton_state["error"] = None, err
        warnings.warn(f"bench: Triton RoPE disabled ({type(err).__name__}: {err}); using the torch version")
        return None


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`layers.apply_rope` in one Triton pass where it can run, the product's torch version otherwise."""
    fast = _apply_rope_triton(x, cos, sin)
    return fast if fast is not None else layers.apply_rope(x, cos, sin)


@contextlib.contextmanager
def rope_variant(name: str) -> Iterator[None]:
    """Both models' RoPE as `name` (`ROPE_IMPLS`) inside the block."""
    if name not in ROPE_IMPLS:
        raise ValueError(f"RoPE implementation {name!r} is not one of {ROPE_IMPLS}")
    with contextlib.ExitStack() as stack:
        if name == "triton":
            for module in (modeling_onevision_encoder, modeling_onevision_encoder_packing):
                stack.enter_context(mock.patch.object(module, "apply_rope", apply_rope_triton))
        yield
