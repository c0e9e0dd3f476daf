"""Checks made before trusting a pair of loaded models (configs agree, weights and RoPE tables are sane), and
the descriptions of a pass that did not repeat (decode or features)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .compare import compare_features
from .models import ARCHITECTURE_FIELDS
from .models.layers import rope_axis_dims


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


def expected_inv_freqs(config) -> torch.Tensor:
    """Every value the release's RoPE inverse frequencies may take: 1 / theta ** (j / n) per axis of size n."""
    head_dim = config.hidden_size // config.num_attention_heads
    return torch.cat([
        1.0 / float(config.rope_theta) ** (torch.arange(n, dtype=torch.float64) / n) for n in rope_axis_dims(head_dim)
    ])


def loaded_model_problems(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers that cannot be what the checkpoint meant; empty when all are sane.

    Catches what a comparison of two equally broken models can miss: non-finite values, weight matrices
    left all zero, and RoPE `inv_freq` buffers (the release code keeps them as non-persistent buffers,
    which come out uninitialised when a model is built on the meta device) that are not the RoPE formula.
    """
    problems = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if tensor.is_meta:
            problems.append(f"{name}: still on the meta device (never loaded)")
            continue
        values = tensor.detach().float()
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            problems.append(f"{name}: {bad} of {values.numel()} values are NaN or Inf")
        elif values.ndim >= 2 and not values.any():
            problems.append(f"{name}: all zeros (weights not loaded?)")
        if "inv_freq" in name:
            problems.extend(_inv_freq_problems(name, values, tensor.dtype, model.config))
    return problems


def _inv_freq_problems(name: str, values: torch.Tensor, dtype: torch.dtype, config) -> list[str]:
    allowed = expected_inv_freqs(config).to(values.device)
    flat = values.double().flatten()
    distance = (flat[:, None] - allowed[None, :]).abs().min(dim=1).values
    tolerance = (1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5) * flat.abs() + 1e-6
    wrong = int((distance > tolerance).sum())
    if wrong:
        worst = float(flat[distance.argmax()])
        return [f"{name}: {wrong} of {flat.numel()} values are not RoPE inverse frequencies 1/theta**(j/n) "
                f"(theta {config.rope_theta}; e.g. {worst if math.isfinite(worst) else 'non-finite'})"]
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
