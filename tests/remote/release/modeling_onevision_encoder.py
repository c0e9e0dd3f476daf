"""Release-format non-packing encoder (written from the model facts, for tests): pixel_values (B, C, H, W) or
(B, C, T, H, W), optional visible_indices / patch_positions; eager attention with the softmax in the input dtype,
flash-attn's dense kernel when that package imports."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_onevision_encoder import OneVisionEncoderConfig

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

TEMPORAL_SIZE = 64


def rotate_pairs(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VideoRotaryEmbedding(nn.Module):
    def __init__(self, head_dim, theta):
        super().__init__()
        unit = head_dim // 2 // 16
        for axis, size in zip("thw", (4 * unit, 6 * unit, 6 * unit)):
            inv = 1.0 / theta ** (torch.arange(size, dtype=torch.float32) / size)
            self.register_buffer(f"inv_freq_{axis}", inv, persistent=False)

    def forward(self, positions):
        """positions (..., 3) -> cos, sin (..., head_dim) float32."""
        positions = positions.float()
        freqs = torch.cat([positions[..., 0:1] * self.inv_freq_t, positions[..., 1:2] * self.inv_freq_h,
                           positions[..., 2:3] * self.inv_freq_w], dim=-1)
        table = torch.cat([freqs, freqs], dim=-1)
        return table.cos(), table.sin()


class OneVisionEncoderAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_pairs(q) * sin
        k = k * cos + rotate_pairs(k) * sin
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=self.scale)
            out = out.transpose(1, 2)
        else:
            weights = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            out = torch.matmul(weights.softmax(dim=-1), v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


def make_norm(config):
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class OneVisionEncoderMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if "tanh" in config.hidden_act else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class OneVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = make_norm(config)
        self.self_attn = OneVisionEncoderAttention(config)
        self.layer_norm2 = make_norm(config)
        self.mlp = OneVisionEncoderMLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin)
        return x + self.mlp(self.layer_norm2(x))


class OneVisionEncoderEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(OneVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class OneVisionEncoderEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)


class OneVisionEncoderHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = OneVisionEncoderMLP(config)

    def forward(self, x):
        pooled = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        return (pooled + self.mlp(self.norm(pooled)))[:, 0]


class OneVisionEncoderModel(PreTrainedModel):
    config_class = OneVisionEncoderConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = OneVisionEncoderEmbeddings(config)
        self.layernorm_pre = make_norm(config)
        self.encoder = OneVisionEncoderEncoder(config)
        self.video_rope = VideoRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        if config.use_head:
            self.layernorm_post = make_norm(config)
            self.head = OneVisionEncoderHead(config)
        self.post_init()

    def forward(self, pixel_values, visible_indices=None, patch_positions=None, output_hidden_states=None,
                return_dict=None):
        video = pixel_values.dim() == 5
        frames = pixel_values if video else pixel_values.unsqueeze(2)
        b, c, t, height, width = frames.shape
        p = self.config.patch_size
        h, w = height // p, width // p
        x = self.embeddings.patch_embedding(frames.transpose(1, 2).reshape(b * t, c, height, width))
        x = x.flatten(2).transpose(1, 2).reshape(b, t * h * w, -1)
        x = self.layernorm_pre(x)
        if patch_positions is None:
            grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            patch_positions = torch.stack(grid, dim=-1).reshape(1, -1, 3).to(x.device)
        cos, sin = self.video_rope(patch_positions)
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        if visible_indices is not None:
            index = visible_indices.to(x.device)
            x = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
            cos = torch.gather(cos, 1, index[..., None].expand(-1, -1, cos.shape[-1]))
            sin = torch.gather(sin, 1, index[..., None].expand(-1, -1, sin.shape[-1]))
        cos, sin = cos[:, None], sin[:, None]
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x, cos, sin)
            hidden.append(x)
        pooled = None
        if self.config.use_head:
            x = self.layernorm_post(x)
            pooled = self.head(x)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                          hidden_states=tuple(hidden) if output_hidden_states else None)
