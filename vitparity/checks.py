"""Checks made before trusting a pair of loaded models (configs agree, weights and RoPE tables are sane), and
the descriptions of a pass that did not repeat (decode or features)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .buffers import largest_difference, non_persistent_buffers
from .compare import compare_features
from .models import ARCHITECTURE_FIELDS
from .models.layers import VisionRotary3D


# Fields that only change the numerics (a GELU variant, a norm epsilon) or nothing at inference (dropout,
# initialisation, the nominal image size): a difference is reported and feature parity gives the verdict.
NUMERIC_FIELDS = ("hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range", "image_size")
# Fields that define the shapes of the weights or what they mean (sizes, layers, heads, patch, channels, norm type,
# RoPE theta, head): two checkpoints that differ in one of them are not the same model, so a difference is an error.
WEIGHT_FIELDS = tuple(name for name in ARCHITECTURE_FIELDS if name not in NUMERIC_FIELDS)


def config_differences(hf_config, packing_config, fields: tuple[str, ...] = ARCHITECTURE_FIELDS) -> list[str]:
    """Fields (by default the architecture fields) whose values differ between the two configs, as readable lines."""
    return [
        f"{name}: hf {getattr(hf_config, name, None)!r} vs packing {getattr(packing_config, name, None)!r}"
        for name in fields
        if getattr(hf_config, name, None) != getattr(packing_config, name, None)
    ]


def split_config_differences(hf_config, packing_config, *, strict: bool = False) -> tuple[list[str], list[str]]:
    """(errors, warnings): differences in WEIGHT_FIELDS are errors, those in NUMERIC_FIELDS warnings;
    `strict` makes every difference an error."""
    errors = config_differences(hf_config, packing_config, WEIGHT_FIELDS)
    warnings = config_differences(hf_config, packing_config, NUMERIC_FIELDS)
    return (errors + warnings, []) if strict else (errors, warnings)


ROPE_AXIS_NAMES = ("t", "h", "w")
# Relative tolerance of a RoPE inverse frequency held in float32 or wider against the formula computed in float32
# (the same float32 arithmetic gives the same bits; a float64 computation cast down differs by at most half an ulp).
# A 16-bit buffer is allowed one unit in the last place of its own dtype.
INV_FREQ_RTOL = 1e-6


def rope_axis_tables(config) -> dict[str, torch.Tensor]:
    """Axis ("t", "h", "w") -> the release's RoPE inverse frequencies of that axis, 1 / theta ** (j / n), j < n, in
    float32 (`VisionRotary3D.inv_freqs`)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return dict(zip(ROPE_AXIS_NAMES, VisionRotary3D(head_dim, float(config.rope_theta)).inv_freqs()))


def expected_inv_freq(name: str, config) -> tuple[torch.Tensor, str]:
    """The formula of a RoPE buffer by its name: `..._t`, `..._h`, `..._w` (or `...inv_freq_t`): that axis's
    table; any other `inv_freq` buffer: the three axes' tables concatenated (t, h, w), as one table holds them.
    Returns the values (float32) and what they are, for messages."""
    tables = rope_axis_tables(config)
    axis = name.rsplit("_", 1)[-1]
    if axis in tables and name.rsplit(".", 1)[-1] != "inv_freq":
        return tables[axis], f"axis {axis} (n {tables[axis].numel()})"
    sizes = ", ".join(f"{a} {t.numel()}" for a, t in tables.items())
    return torch.cat(list(tables.values())), f"axes t, h, w concatenated ({sizes})"


def loaded_model_problems(model: torch.nn.Module, checkpoint: str | Path | None = None) -> list[str]:
    """Parameters and buffers that are not what the checkpoint and the code mean; empty when all are.

    Every floating parameter and buffer, 1-D included: no value on the meta device, no NaN or Inf, no weight
    matrix left all zero and no norm gain all zero (a checkpoint that holds zeros there is broken too). With
    `checkpoint` (the folder the model was loaded from), every tensor the checkpoint holds is compared with the
    loaded one element by element, after the cast the load makes (`tensor.to(loaded dtype)`): any element that
    differs is a problem naming the tensor, the count and the largest difference. RoPE `inv_freq` buffers are
    compared with the formula of their own axis (`expected_inv_freq`), within INV_FREQ_RTOL (one ulp of a 16-bit
    dtype); other non-persistent buffers are checked against a fresh construction when the model loads
    (`buffers.check_buffers`). A parameter the checkpoint does not hold is named; so is a checkpoint that cannot be
    read.
    """
    problems: list[str] = []
    saved_names: set[str] = set()
    norms = {name for name, module in model.named_modules()
             if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm))
             or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))}
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        if tensor.is_meta:
            problems.append(f"{name}: still on the meta device (never loaded)")
            continue
        values = tensor.detach()
        bad = int((~torch.isfinite(values)).sum())
        module, _, leaf = name.rpartition(".")
        if bad:
            problems.append(f"{name}: {bad} of {values.numel()} values are NaN or Inf")
        elif values.ndim >= 2 and not values.any():
            problems.append(f"{name}: all zeros (weights not loaded?)")
        elif module in norms and leaf == "weight" and not values.any():
            problems.append(f"{name}: norm gain all zeros (every output of the norm is its bias)")
        if "inv_freq" in leaf:
            problems.extend(_inv_freq_problems(name, values, model.config))
    if checkpoint is not None:
        persistent = {name: tensor for name, tensor in tensors.items() if name not in non_persistent_buffers(model)}
        try:
            problems.extend(_checkpoint_differences(persistent, Path(checkpoint), saved_names))
        except (OSError, ValueError, RuntimeError) as err:
            problems.append(f"cannot compare with the checkpoint in {checkpoint}: {type(err).__name__}: {err}")
        else:
            missing = sorted(name for name, _ in model.named_parameters() if name not in saved_names)
            if missing:
                problems.append(f"{len(missing)} parameters not in the checkpoint (left as initialised): "
                                + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return problems


def _checkpoint_tensors(folder: Path):
    """(name, tensor) of every tensor in the folder's safetensors files, or else its pytorch_model*.bin files."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        return
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError("no *.safetensors or pytorch_model*.bin files")
    for path in files:
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def _checkpoint_differences(tensors: dict[str, torch.Tensor], folder: Path, seen: set[str]) -> list[str]:
    """One line per loaded tensor that differs from the checkpoint's tensor of the same name (cast to the loaded
    dtype), element by element; fills `seen` with the names compared. Checkpoint tensors the model has no
    persistent tensor for are left to the loader's key check (`loading.load_model`)."""
    problems = []
    for key, saved in _checkpoint_tensors(folder):
        loaded = tensors.get(key)
        if loaded is None or loaded.is_meta:
            continue
        seen.add(key)
        want = saved.to(loaded.dtype)
        got = loaded.detach().cpu()
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key}: loaded shape {tuple(got.shape)}, checkpoint {tuple(want.shape)}")
            continue
        same = (got == want) | (torch.isnan(got) & torch.isnan(want)) if got.is_floating_point() else got == want
        differ = int((~same).sum())
        if differ:
            problems.append(f"{key}: {differ} of {got.numel()} values differ from the checkpoint "
                            f"(saved as {saved.dtype}, loaded as {loaded.dtype}); {largest_difference(got, want)}")
    return problems


def _inv_freq_problems(name: str, values: torch.Tensor, config) -> list[str]:
    """A RoPE inverse-frequency buffer against the formula of its own axis, element by element."""
    want, what = expected_inv_freq(name, config)
    got = values.double().flatten().cpu()
    if got.numel() != want.numel():
        return [f"{name}: {got.numel()} values, not RoPE inverse frequencies 1/theta**(j/n) of {what}"]
    rtol = torch.finfo(values.dtype).eps if values.element_size() < 4 else INV_FREQ_RTOL
    want = want.to(values.dtype).double()
    wrong = int(((got - want).abs() > rtol * want.abs()).sum()) + int((~torch.isfinite(got)).sum())
    if wrong:
        return [f"{name}: {wrong} of {got.numel()} values are not RoPE inverse frequencies 1/theta**(j/n) of {what} "
                f"(theta {config.rope_theta}, relative tolerance {rtol:g}); {largest_difference(got, want)}"]
    return []


def pixel_difference(a: np.ndarray, b: np.ndarray) -> str:
    """How two decodes of the same media differ: values that differ and by how much, or the shapes."""
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return f"{np.count_nonzero(diff)} of {diff.size} values differ, by up to {int(diff.max())}"


def feature_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """How two passes' features (N, D) differ: max abs difference, tokens that differ, min per-token cosine."""
    comparison = compare_features(a, b, labels=("first pass", "second pass"))
    if a.shape != b.shape:
        return comparison.reason
    tokens = int((a != b).any(dim=-1).sum())
    return (f"max abs difference {comparison.max_abs:.3e}, {tokens} of {a.shape[0]} tokens differ, "
            f"min cos {comparison.min_cos:.7f}")


def odd_pass(first: torch.Tensor, second: torch.Tensor, third: torch.Tensor) -> str:
    """Which of three passes on the same input disagrees with the other two (first and second already differ)."""
    if torch.equal(first, third):
        return "a third pass equals the first: the second pass was the odd one"
    if torch.equal(second, third):
        return "a third pass equals the second: the first pass was the odd one"
    return f"a third pass differs from both ({feature_difference(second, third)} from the second): every pass differs"
