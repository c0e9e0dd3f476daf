"""Checkpoint code: the project's encoders with the release's habits, for loading tests.

- The config classes have no `rope_temporal_size` (the release's config class has none).
- The RoPE inverse frequencies (`rotary.inv_freq_{t,h,w}`), a float scale (`rotary.freqs_scale`) and integer axis
  indices (`rotary.position_axes`) are non-persistent buffers computed by the constructor and read by every forward
  pass, so values left uninitialised by loading change the features.

Copied into a checkpoint folder and named by its `auto_map`; it imports only torch and vitparity.
"""

from __future__ import annotations

import torch

from vitparity.models import (
    OneVisionEncoderConfig,
    OneVisionEncoderModel,
    OneVisionEncoderPackingConfig,
    OneVisionEncoderPackingModel,
)
from vitparity.models.layers import VisionRotary3D


class BufferedRotary3D(VisionRotary3D):
    """The release's 3-D RoPE, its tables and helpers kept as non-persistent buffers."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__(head_dim, theta)
        for axis, values in zip("thw", super().inv_freqs()):
            self.register_buffer(f"inv_freq_{axis}", values, persistent=False)
        self.register_buffer("freqs_scale", torch.ones(()), persistent=False)
        self.register_buffer("position_axes", torch.arange(3), persistent=False)

    def inv_freqs(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple((getattr(self, f"inv_freq_{axis}") * self.freqs_scale).to(device) for axis in "thw")

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(positions.index_select(-1, self.position_axes.to(positions.device)))


class BufferedHFConfig(OneVisionEncoderConfig):
    model_type = "buffered_onevision_encoder"

    def __init__(self, **kwargs) -> None:
        kwargs.pop("rope_temporal_size", None)
        super().__init__(**kwargs)
        del self.rope_temporal_size


class BufferedPackingConfig(OneVisionEncoderPackingConfig):
    model_type = "buffered_onevision_encoder_packing"


class BufferedHFModel(OneVisionEncoderModel):
    config_class = BufferedHFConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        self.rotary = BufferedRotary3D(config.head_dim, config.rope_theta)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """As the project's check, without a temporal limit: this config has no rope_temporal_size."""
        self.config.rope_temporal_size = None
        try:
            return super()._check_pixel_values(pixel_values)
        finally:
            del self.config.rope_temporal_size


class BufferedPackingModel(OneVisionEncoderPackingModel):
    config_class = BufferedPackingConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        self.rotary = BufferedRotary3D(config.head_dim, config.rope_theta)


def _init_buffers(model, module) -> None:
    """With config `buffers_initialised_wrong` set, weight initialisation overwrites the buffers with 7: as a class
    whose `_init_weights` writes buffers would, so loading gives wrong values every time (not by chance of memory)."""
    if isinstance(module, BufferedRotary3D) and getattr(model.config, "buffers_initialised_wrong", False):
        for buffer in module.buffers():
            buffer.fill_(7)


BufferedHFModel._init_weights = lambda self, module: (OneVisionEncoderModel._init_weights(self, module),
                                                      _init_buffers(self, module))
BufferedPackingModel._init_weights = lambda self, module: (OneVisionEncoderPackingModel._init_weights(self, module),
                                                           _init_buffers(self, module))
