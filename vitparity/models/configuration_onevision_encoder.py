"""Configurations of the non-packing and packing OneVision-Encoder models."""

from __future__ import annotations

from transformers import PretrainedConfig

LAYER_NORM_TYPES = ("layer_norm", "rms_norm")

# Fields that decide the maths of both models; two checkpoints compared for parity must agree on them.
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "layer_norm_type",
    "rope_theta",
    "use_head",
)


class _EncoderConfigBase(PretrainedConfig):
    """Fields shared by both implementations (see the model facts, section 1)."""

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 448,
        patch_size: int = 14,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        layer_norm_type: str = "layer_norm",
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rope_theta: float = 10000.0,
        use_head: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        head_dim = hidden_size // num_attention_heads
        if head_dim % 32:
            raise ValueError(f"head_dim {head_dim} must be divisible by 32 for the 3-D RoPE split (4:6:6 of head_dim/2)")
        if layer_norm_type not in LAYER_NORM_TYPES:
            raise ValueError(f"layer_norm_type must be one of {LAYER_NORM_TYPES}, got {layer_norm_type!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layer_norm_type = layer_norm_type
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rope_theta = rope_theta
        self.use_head = use_head

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class OneVisionEncoderConfig(_EncoderConfigBase):
    """Configuration of the non-packing model (`pixel_values` input).

    `rope_temporal_size` is the temporal RoPE context of 5-D input (64 in the release);
    None uses the number of frames given.
    """

    model_type = "onevision_encoder"

    def __init__(self, rope_temporal_size: int | None = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rope_temporal_size = rope_temporal_size


class OneVisionEncoderPackingConfig(_EncoderConfigBase):
    """Configuration of the packing model (flat patch sequence with `grid_thw`).

    `temporal_patch_size` and `spatial_merge_size` are kept for checkpoint compatibility; the maths
    does not use them.
    """

    model_type = "onevision_encoder_packing"

    def __init__(self, temporal_patch_size: int = 1, spatial_merge_size: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = spatial_merge_size


class LlavaViTConfig(OneVisionEncoderConfig):
    """Older name of the non-packing configuration (same fields and maths)."""

    model_type = "llava_vit"

    def __init__(self, **kwargs) -> None:  # explicit: transformers replaces an inherited __init__ on subclasses
        super().__init__(**kwargs)


class LlavaViTPackingConfig(OneVisionEncoderPackingConfig):
    """Older name of the packing configuration (same fields and maths)."""

    model_type = "llava_vit_packing"

    def __init__(self, **kwargs) -> None:  # explicit: transformers replaces an inherited __init__ on subclasses
        super().__init__(**kwargs)
