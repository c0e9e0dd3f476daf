"""Non-persistent buffers after loading, checked against a fresh construction of the same class.

A non-persistent buffer (`register_buffer(..., persistent=False)`: RoPE inverse frequencies, position ids,
scales) is computed by the model's constructor and is not part of its state dict. transformers 5 builds models on
the meta device and gives such a buffer, when the checkpoint does not carry it, uninitialised memory unless the
class's `_init_weights` recomputes it. The release's own model classes do not, so their RoPE tables come back as
garbage. The reference is the same class built again from the same config on the CPU with its weights left
uninitialised (`transformers.initialization.no_init_weights`), under the default dtype the load used: its buffers
are what the constructor computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.initialization import no_init_weights

# Relative tolerance of a saved floating buffer against the constructor's value, for buffers of at least float32
# precision; a 16-bit buffer is allowed one unit in the last place of its own dtype (`torch.finfo(dtype).eps`).
SAVED_BUFFER_RTOL = 1e-6


@dataclass(frozen=True)
class BufferFindings:
    """What the check found. `restore`: buffer name -> the fresh construction's value, for buffers the checkpoint
    does not carry whose loaded value differs (a loading artefact); `differences`: name -> the largest difference
    of each of them (text); `saved_wrong`: one line per buffer the checkpoint carries with another value than the
    constructor computes (an error: the checkpoint disagrees with the code)."""

    restore: dict[str, torch.Tensor]
    differences: dict[str, str]
    saved_wrong: list[str]


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every non-persistent buffer of `model` (names as in the module tree: `video_rope.inv_freq_t`)."""
    found = {}
    for name, tensor in model.named_buffers():
        parent, _, leaf = name.rpartition(".")
        if leaf in model.get_submodule(parent)._non_persistent_buffers_set:
            found[name] = tensor
    return found


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def fresh_buffers(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of `type(model)` built again from `model.config` on the CPU, weights left
    uninitialised, with `dtype` as the default dtype (as transformers' from_pretrained builds it)."""
    with torch.device("cpu"), _default_dtype(dtype), no_init_weights():
        fresh = type(model)(model.config)
    return {name: tensor.detach() for name, tensor in non_persistent_buffers(fresh).items()}


def largest_difference(got: torch.Tensor, want: torch.Tensor) -> str:
    """Where and by how much two same-shaped tensors differ most (the values compared in float64; a non-finite
    value counts as an infinite difference), e.g. `largest difference 3.1e+02 at index 5 (3.1e+02 vs 1.0)`."""
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    a, b = got.detach().double().cpu().flatten(), want.detach().double().cpu().flatten()
    if a.numel() == 0:
        return "no values"
    difference = torch.nan_to_num((a - b).abs(), nan=float("inf"))
    worst = int(difference.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), tuple(got.shape))) if got.ndim > 1 else worst
    shown = [float(x[worst]) if t.is_floating_point() else int(x[worst]) for x, t in ((a, got), (b, want))]
    return f"largest difference {float(difference[worst]):.3g} at index {index} ({shown[0]!r} vs {shown[1]!r})"


def _same(loaded: torch.Tensor, fresh: torch.Tensor) -> bool:
    """Bit-for-bit equal values (NaN equal to NaN), same shape and dtype."""
    if loaded.is_meta or loaded.dtype != fresh.dtype or loaded.shape != fresh.shape:
        return False
    if loaded.is_floating_point():
        return bool(torch.allclose(loaded.cpu(), fresh, rtol=0, atol=0, equal_nan=True))
    return bool(torch.equal(loaded.cpu(), fresh))


def _saved_matches(saved: torch.Tensor, fresh: torch.Tensor) -> bool:
    """Whether a checkpoint's value is the constructor's: exactly for integers and booleans, within
    SAVED_BUFFER_RTOL (or one unit of a 16-bit buffer's precision) relative for floating buffers."""
    if tuple(saved.shape) != tuple(fresh.shape):
        return False
    if not fresh.is_floating_point():
        return not saved.is_floating_point() and bool(torch.equal(saved.to(fresh.dtype), fresh))
    want, got = fresh.double(), saved.double()
    rtol = max(SAVED_BUFFER_RTOL, torch.finfo(fresh.dtype).eps if fresh.element_size() < 4 else 0.0)
    return bool(torch.isfinite(got).all()) and bool(((got - want).abs() <= rtol * want.abs()).all())


def check_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor], dtype: torch.dtype) -> BufferFindings:
    """Compare every non-persistent buffer of a loaded `model` with a fresh construction (`fresh_buffers`).

    `saved`: the checkpoint's tensors of the same names (the buffers it carries). A carried buffer must equal the
    constructor's value (`_saved_matches`), else it is listed in `saved_wrong` naming the module, the buffer and the
    largest difference; a buffer whose loaded value is not bit-for-bit the constructor's is listed in `restore`.
    A model without non-persistent buffers is not built again.
    """
    loaded = non_persistent_buffers(model)
    if not loaded:
        return BufferFindings({}, {}, [])
    fresh = fresh_buffers(model, dtype)
    restore, differences, saved_wrong = {}, {}, []
    for name, tensor in loaded.items():
        want = fresh[name].to(tensor.dtype)
        if name in saved and not _saved_matches(saved[name], want):
            module, _, buffer = name.rpartition(".")
            saved_wrong.append(
                f"module {module or '(root)'} ({type(model.get_submodule(module)).__name__}) buffer {buffer}: the "
                f"checkpoint's value (saved as {saved[name].dtype}) is not what the constructor computes, "
                f"{largest_difference(saved[name], want)}"
            )
        elif not _same(tensor, want):  # not carried, or carried right but not loaded: a loading artefact
            restore[name] = want
            differences[name] = "on the meta device" if tensor.is_meta else largest_difference(tensor, want)
    return BufferFindings(restore, differences, saved_wrong)


def restore_buffers(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Put `values` (name -> tensor) in place of the named buffers, on each buffer's module, keeping them
    non-persistent; the tensors go to the device of the module's other tensors."""
    for name, value in values.items():
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent)
        old = module._buffers[leaf]
        device = old.device if old is not None and not old.is_meta else value.device
        module._buffers[leaf] = value.to(device).clone()
