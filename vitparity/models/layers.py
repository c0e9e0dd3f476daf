"""Building blocks shared by the non-packing and packing encoders: 3-D RoPE, norms, MLP, pooling head."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_onevision_encoder import _EncoderConfigBase


def make_norm(config: _EncoderConfigBase, dim: int | None = None) -> nn.Module:
    """LayerNorm (with bias) or RMSNorm (weight only), as the config says."""
    dim = dim or config.hidden_size
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Frequencies per axis (t, h, w): head_dim/2 split 4:6:6."""
    unit = head_dim // 2 // 16
    return 4 * unit, 6 * unit, 6 * unit


class VisionRotary3D(nn.Module):
    """3-D rotary embedding of the release.

    The inverse frequencies are computed from the config at every call (a few dozen values) instead of
    being stored as buffers, so loading on the meta device can never leave them uninitialised.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freqs(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per axis of size n: 1 / theta ** (j / n), j = 0..n-1, in float32."""
        return tuple(
            1.0 / self.theta ** (torch.arange(n, dtype=torch.float32, device=device) / n)
            for n in rope_axis_dims(self.head_dim)
        )

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., 3) as (t, h, w) -> cos, sin of shape (..., head_dim), float32."""
        pos = positions.to(torch.float32)
        inv_t, inv_h, inv_w = self.inv_freqs(positions.device)
        freqs = torch.cat([pos[..., 0:1] * inv_t, pos[..., 1:2] * inv_h, pos[..., 2:3] * inv_w], dim=-1)
        table = torch.cat([freqs, freqs], dim=-1)
        return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate(x) * sin in float32, cast back to x's dtype: the formula, written plainly."""
    xf = x.float()
    return (xf * cos + rotate_pairs(xf) * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate(x) * sin, computed in float32 and written in x's dtype (same maths as
    `apply_rope_reference`) in four elementwise passes over half-size views instead of about a dozen (a one-pass
    Triton kernel is a benchmark variant: bench/kernels/).

    With x = (.., x_even, x_odd) pairs: out_even = x_even * cos_even - x_odd * sin_even and
    out_odd = x_odd * cos_odd + x_even * sin_odd. cos / sin (float32) must broadcast against x
    (token axis aligned, head axis of size 1). The result keeps x's memory layout where x is dense.
    """
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return apply_rope_reference(x, cos, sin)
    out = torch.empty_like(x)
    xp, op = x.unflatten(-1, (-1, 2)), out.unflatten(-1, (-1, 2))
    cp, sp = cos.unflatten(-1, (-1, 2)), sin.unflatten(-1, (-1, 2))
    x_even, x_odd = xp[..., 0], xp[..., 1]
    # bf16 * float32 promotes inside the kernel: the products are the float32 products of the reference.
    torch.addcmul(x_even * cp[..., 0], x_odd, sp[..., 0], value=-1, out=op[..., 0])
    torch.addcmul(x_odd * cp[..., 1], x_even, sp[..., 1], out=op[..., 1])
    return out


def patch_grid_positions(t: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(t*h*w, 3) positions (t, h, w) in frame-major, then row-major order."""
    grids = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack(grids, dim=-1).reshape(-1, 3)


class EncoderMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: _EncoderConfigBase) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)); x + mlp(ln2(x)). The attention module is given."""

    def __init__(self, config: _EncoderConfigBase, self_attn: nn.Module) -> None:
        super().__init__()
        self.layer_norm1 = make_norm(config)
        self.self_attn = self_attn
        self.layer_norm2 = make_norm(config)
        self.mlp = EncoderMLP(config)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), cos, sin, **attn_kwargs)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class PoolingHead(nn.Module):
    """Attention pooling with a learned probe, then RMSNorm and a residual MLP; one vector per sample."""

    def __init__(self, config: _EncoderConfigBase) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EncoderMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D)."""
        probe = self.probe.expand(hidden_states.shape[0], -1, -1)
        pooled = self.attention(probe, hidden_states, hidden_states, need_weights=False)[0]
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]
