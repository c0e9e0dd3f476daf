"""Packing OneVision-Encoder: one flat sequence of patches from many images and videos (`grid_thw`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_onevision_encoder import LlavaViTPackingConfig, OneVisionEncoderPackingConfig, _EncoderConfigBase
from .layers import EncoderLayer, PoolingHead, VisionRotary3D, apply_rope, make_norm, patch_grid_positions
from .modeling_onevision_encoder import OneVisionEncoderPreTrainedModel, layers_to_run
from .packed_attention import PackedSegments, check_implementation, host_to_device, packed_attention


class OneVisionEncoderPatchEmbed(nn.Module):
    """The Conv2d patch embedding applied to rows that are patches flattened in (C, p, p) order."""

    def __init__(self, config: _EncoderConfigBase) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(hidden_states.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class OneVisionEncoderPackingAttention(nn.Module):
    """Block-diagonal multi-head attention with RoPE, fused qkv projection."""

    def __init__(self, config: _EncoderConfigBase) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: PackedSegments,
        implementation: str = "sdpa",
    ) -> torch.Tensor:
        """hidden_states (N, D); cos / sin (N, 1, head_dim); implementation: transformers' attn_implementation
        name (`packed_attention.ATTN_IMPLEMENTATIONS`)."""
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = packed_attention(q, k, v, segments, self.scale, implementation)
        return self.proj(out.reshape(n, -1))


class OneVisionEncoderPackingModel(OneVisionEncoderPreTrainedModel):
    """The packing encoder, with the release's state-dict key names (`patch_embed.proj`, fused `qkv`, `proj`)."""

    config_class = OneVisionEncoderPackingConfig
    main_input_name = "hidden_states"

    def __init__(self, config: OneVisionEncoderPackingConfig) -> None:
        super().__init__(config)
        self.patch_embed = OneVisionEncoderPatchEmbed(config)
        self.layernorm_pre = make_norm(config)
        self.rotary = VisionRotary3D(config.head_dim, config.rope_theta)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            EncoderLayer(config, OneVisionEncoderPackingAttention(config)) for _ in range(config.num_hidden_layers)
        )
        if config.use_head:
            self.layernorm_post = make_norm(config)
            self.head = PoolingHead(config)
        self.post_init()

    def _segments(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> tuple[list[list[int]], PackedSegments]:
        """Validate the packed input against grid_thw and return the grid rows and sample boundaries."""
        c, p = self.config.num_channels, self.config.patch_size
        if hidden_states.dim() != 2 or hidden_states.shape[1] != c * p * p:
            raise ValueError(
                f"hidden_states must be (N, C*p*p) = (N, {c * p * p}), got shape {tuple(hidden_states.shape)}"
            )
        grid = torch.as_tensor(grid_thw).tolist()
        if not grid or any(len(row) != 3 or min(row) <= 0 for row in grid):
            raise ValueError(f"grid_thw must be (S, 3) positive [t, h, w] rows, got {grid}")
        lengths = [t * h * w for t, h, w in grid]
        if sum(lengths) != hidden_states.shape[0]:
            raise ValueError(f"grid_thw covers {sum(lengths)} tokens but hidden_states has {hidden_states.shape[0]}")
        return grid, PackedSegments.from_lengths(lengths, hidden_states.device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_layer: int | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode a packed sequence.

        hidden_states (N, C*p*p): patches in (C, p, p) order, samples concatenated, each frame-major then
        row-major. grid_thw (S, 3): [t, h, w] patches per sample (kept on the host to avoid a device sync).
        patch_positions (N, 3): explicit (t, h, w) RoPE positions, e.g. interpolated video frame positions.
        output_layer: stop early and return `hidden_states[output_layer]` (e.g. -2, the penultimate layer's
        output) as last_hidden_state; the later layers, the post-norm and the head do not run (no pooler_output).
        Returns last_hidden_state (N, D), pooler_output (S, D), hidden_states (num_layers + 1) x (N, D).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_layers = layers_to_run(output_layer, len(self.encoder.layers))
        grid, segments = self._segments(hidden_states, grid_thw)
        device = hidden_states.device

        if patch_positions is None:
            positions = torch.cat([patch_grid_positions(t, h, w, device=device) for t, h, w in grid])
        else:
            positions = host_to_device(torch.as_tensor(patch_positions), device)
            if positions.shape != (hidden_states.shape[0], 3):
                raise ValueError(f"patch_positions must be ({hidden_states.shape[0]}, 3), got {tuple(positions.shape)}")
        cos, sin = self.rotary(positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        x = self.layernorm_pre(self.patch_embed(hidden_states))
        implementation = check_implementation(self.config._attn_implementation)
        all_hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x, cos, sin, segments=segments, implementation=implementation)
            if all_hidden is not None:
                all_hidden.append(x)

        pooled = None
        if self.config.use_head and output_layer is None:
            x = self.layernorm_post(x)
            pooled = torch.cat([self.head(part.unsqueeze(0)) for part in x.split(list(segments.lengths))])
        all_hidden = tuple(all_hidden) if all_hidden is not None else None
        if not return_dict:
            return tuple(v for v in (x, pooled, all_hidden) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=all_hidden)


class LlavaViTPackingModel(OneVisionEncoderPackingModel):
    """The packing encoder under its older `llava_vit_packing` name."""

    config_class = LlavaViTPackingConfig


__all__ = ["OneVisionEncoderPackingModel", "LlavaViTPackingModel"]
