"""Release-format configuration classes (written from the model facts, for tests): both models' config.json fields."""

from transformers import PretrainedConfig


class OneVisionEncoderConfig(PretrainedConfig):
    model_type = "onevision_encoder"

    def __init__(self, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_channels=3, image_size=448, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                 layer_norm_type="layer_norm", attention_dropout=0.0, initializer_range=0.02, rope_theta=10000.0,
                 use_head=True, **kwargs):
        super().__init__(**kwargs)
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


class OneVisionEncoderPackingConfig(OneVisionEncoderConfig):
    model_type = "onevision_encoder_packing"

    def __init__(self, temporal_patch_size=1, spatial_merge_size=1, **kwargs):
        super().__init__(**kwargs)
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = spatial_merge_size
