"""Release-format packing encoder (written from the model facts, for tests): patches (N, C*p*p) of samples packed
one after the other, grid_thw (S, 3), optional patch_positions (N, 3); block-diagonal attention by flash-attn's
varlen kernel, imported when this file is imported (as the release's file does)."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from flash_attn import flash_attn_varlen_func

from .configuration_onevision_encoder import OneVisionEncoderPackingConfig
from .modeling_onevision_encoder import (
    OneVisionEncoderEncoder, OneVisionEncoderHead, OneVisionEncoderMLP, make_norm, rotate_pairs,
    VideoRotaryEmbedding,
)


class PackingAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = (q.float() * cos + rotate_pairs(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_pairs(k.float()) * sin).to(x.dtype)
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0,
                                     softmax_scale=self.scale, causal=False)
        return self.proj(out.reshape(n, -1))


class PackingLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = make_norm(config)
        self.self_attn = PackingAttention(config)
        self.layer_norm2 = make_norm(config)
        self.mlp = OneVisionEncoderMLP(config)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size,
                              bias=False)

    def forward(self, patches):
        p, c = self.config.patch_size, self.config.num_channels
        return self.proj(patches.view(-1, c, p, p)).flatten(1)


class OneVisionEncoderPackingModel(PreTrainedModel):
    config_class = OneVisionEncoderPackingConfig
    main_input_name = "hidden_states"

    def __init__(self, config):
        super().__init__(config)
        self.patch_embed = PatchEmbed(config)
        self.layernorm_pre = make_norm(config)
        self.encoder = OneVisionEncoderEncoder(config)
        self.encoder.layers = nn.ModuleList(PackingLayer(config) for _ in range(config.num_hidden_layers))
        self.rotary_emb = VideoRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        if config.use_head:
            self.layernorm_post = make_norm(config)
            self.head = OneVisionEncoderHead(config)
        self.post_init()

    def forward(self, hidden_states, grid_thw, patch_positions=None, output_hidden_states=None, return_dict=None):
        lengths = [int(t * h * w) for t, h, w in grid_thw.tolist()]
        if patch_positions is None:
            rows = [torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"),
                                dim=-1).reshape(-1, 3) for t, h, w in grid_thw.tolist()]
            patch_positions = torch.cat(rows)
        cos, sin = self.rotary_emb(patch_positions.to(hidden_states.device))
        cos, sin = cos[:, None], sin[:, None]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                  device=hidden_states.device)
        x = self.layernorm_pre(self.patch_embed(hidden_states))
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, cu_seqlens, max(lengths))
            hidden.append(x)
        pooled = None
        if self.config.use_head:
            x = self.layernorm_post(x)
            pooled = torch.cat([self.head(part[None]) for part in x.split(lengths)])
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                          hidden_states=tuple(hidden) if output_hidden_states else None)
