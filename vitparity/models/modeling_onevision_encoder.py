"""Non-packing OneVision-Encoder: `pixel_values` (B, C, H, W) or (B, C, T, H, W), optional `visible_indices`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_onevision_encoder import LlavaViTConfig, OneVisionEncoderConfig, _EncoderConfigBase
from .layers import EncoderLayer, PoolingHead, VisionRotary3D, apply_rope, make_norm, patch_grid_positions
from .packed_attention import dense_attention, host_to_device


def layers_to_run(output_layer: int | None, num_layers: int) -> int:
    """Encoder layers to run so that the last one's output is `hidden_states[output_layer]` (None: all of them).

    `output_layer` indexes hidden_states, which has num_layers + 1 entries (0: the embedding output); negative
    values count from the end, so -2 is the output of the penultimate layer.
    """
    if output_layer is None:
        return num_layers
    if not -(num_layers + 1) <= output_layer <= num_layers:
        raise ValueError(
            f"output_layer={output_layer} is outside hidden_states[{-(num_layers + 1)}..{num_layers}] "
            f"of a model with {num_layers} layers"
        )
    return output_layer % (num_layers + 1)


class OneVisionEncoderPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by both implementations."""

    config_class = OneVisionEncoderConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = False
    # transformers' attn_implementation names these models run (packed_attention.ATTN_IMPLEMENTATIONS): "sdpa"
    # (the default) and "eager"; transformers refuses flash and flex attention for them at loading.
    _supports_sdpa = True
    _no_split_modules = ["EncoderLayer"]

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """The attention layers read `config._attn_implementation` at every forward, so it may change at any time."""
        return True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PoolingHead):
            init.normal_(module.probe, mean=0.0, std=self.config.initializer_range)


class OneVisionEncoderEmbeddings(nn.Module):
    """Per-frame Conv2d patch embedding (no bias), evaluated only on the tokens that are kept."""

    def __init__(self, config: _EncoderConfigBase) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )

    def forward(self, pixel_values: torch.Tensor, token_indices: torch.Tensor | None) -> torch.Tensor:
        """pixel_values (B, C, T, H, W); token_indices (B, K) into the frame-major token grid, or None for all.

        Gathering patches first is the same maths as convolving every frame and gathering after
        (the patch embedding and layernorm_pre act per token), without paying for unused frames.
        """
        b, c, t, height, width = pixel_values.shape
        p = self.patch_size
        h, w = height // p, width // p
        grid = pixel_values.view(b, c, t, h, p, w, p)
        if token_indices is None:
            patches = grid.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * h * w, c * p * p)
        else:
            frame, rest = token_indices // (h * w), token_indices % (h * w)
            batch = torch.arange(b, device=pixel_values.device)[:, None]
            patches = grid[batch, :, frame, rest // w, :, rest % w, :].reshape(b, token_indices.shape[1], c * p * p)
        weight = self.patch_embedding.weight
        return F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class OneVisionEncoderAttention(nn.Module):
    """Bidirectional multi-head attention with RoPE on q and k, separate q/k/v projections."""

    def __init__(self, config: _EncoderConfigBase) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        implementation: str = "sdpa",
    ) -> torch.Tensor:
        """hidden_states (B, N, D); cos / sin (B or 1, 1, N, head_dim); implementation: transformers'
        attn_implementation name (`packed_attention.ATTN_IMPLEMENTATIONS`)."""
        b, n, d = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(hidden_states)), cos, sin)
        k = apply_rope(heads(self.k_proj(hidden_states)), cos, sin)
        v = heads(self.v_proj(hidden_states))
        if self.training and self.dropout > 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, scale=self.scale)
        else:
            out = dense_attention(q, k, v, self.scale, implementation)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class OneVisionEncoderModel(OneVisionEncoderPreTrainedModel):
    """The non-packing encoder, with the release's state-dict key names."""

    main_input_name = "pixel_values"

    def __init__(self, config: OneVisionEncoderConfig) -> None:
        super().__init__(config)
        self.embeddings = OneVisionEncoderEmbeddings(config)
        self.layernorm_pre = make_norm(config)
        self.rotary = VisionRotary3D(config.head_dim, config.rope_theta)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            EncoderLayer(config, OneVisionEncoderAttention(config)) for _ in range(config.num_hidden_layers)
        )
        if config.use_head:
            self.layernorm_post = make_norm(config)
            self.head = PoolingHead(config)
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Validate and return (B, C, T, H, W)."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(2)
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(pixel_values.shape)}")
        c, t, height, width = pixel_values.shape[1:]
        p = self.config.patch_size
        if c != self.config.num_channels:
            raise ValueError(f"pixel_values has {c} channels, the model expects {self.config.num_channels}")
        if height % p or width % p or height == 0 or width == 0:
            raise ValueError(f"pixel_values height and width ({height}x{width}) must be positive multiples of patch_size {p}")
        limit = self.config.rope_temporal_size
        if limit is not None and t > limit:
            raise ValueError(f"{t} frames exceed the temporal RoPE context rope_temporal_size={limit}")
        return pixel_values

    def forward(
        self,
        pixel_values: torch.Tensor,
        visible_indices: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_layer: int | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode images (4-D) or videos (5-D).

        visible_indices (B, K): tokens kept, indices into the frame-major, row-major token grid of all T
        frames; their RoPE positions come from the full grid. patch_positions ((B,) K, 3): explicit (t, h, w)
        RoPE positions of the kept tokens, overriding the grid.
        output_layer: stop early and return `hidden_states[output_layer]` (e.g. -2, the penultimate layer's
        output) as last_hidden_state; the later layers, the post-norm and the head do not run (no pooler_output).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_layers = layers_to_run(output_layer, len(self.encoder.layers))
        pixel_values = self._check_pixel_values(pixel_values)
        b, _, t, height, width = pixel_values.shape
        p = self.config.patch_size
        n_tokens = t * (height // p) * (width // p)
        device = pixel_values.device

        if visible_indices is not None:
            visible_indices = torch.as_tensor(visible_indices)
            if visible_indices.dim() != 2 or visible_indices.shape[0] != b:
                raise ValueError(f"visible_indices must be (B={b}, K), got shape {tuple(visible_indices.shape)}")
            # The range check reads values: free for host indices (checked before the copy), one sync otherwise.
            if visible_indices.numel() and (visible_indices.min() < 0 or visible_indices.max() >= n_tokens):
                raise ValueError(f"visible_indices out of range [0, {n_tokens}) for {t} frames of {height}x{width}")
            visible_indices = host_to_device(visible_indices.to(torch.long), device)
        hidden_states = self.embeddings(pixel_values, visible_indices)

        if patch_positions is None:
            positions = patch_grid_positions(t, height // p, width // p, device=device)
            positions = positions.unsqueeze(0) if visible_indices is None else positions[visible_indices]
        else:
            positions = host_to_device(torch.as_tensor(patch_positions), device)
            if positions.shape[-2:] != (hidden_states.shape[1], 3):
                raise ValueError(
                    f"patch_positions must be ((B,) {hidden_states.shape[1]}, 3), got shape {tuple(positions.shape)}"
                )
            if positions.dim() == 2:
                positions = positions.unsqueeze(0)
        cos, sin = self.rotary(positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        hidden_states = self.layernorm_pre(hidden_states)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.encoder.layers[:num_layers]:
            hidden_states = layer(
                hidden_states, cos, sin, implementation=self.config._attn_implementation
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)

        pooled = None
        if self.config.use_head and output_layer is None:
            hidden_states = self.layernorm_post(hidden_states)
            pooled = self.head(hidden_states)
        all_hidden = tuple(all_hidden) if all_hidden is not None else None
        if not return_dict:
            return tuple(x for x in (hidden_states, pooled, all_hidden) if x is not None)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden)


class LlavaViTModel(OneVisionEncoderModel):
    """The non-packing encoder under its older `llava_vit` name."""

    config_class = LlavaViTConfig


__all__ = ["OneVisionEncoderPreTrainedModel", "OneVisionEncoderModel", "LlavaViTModel"]
