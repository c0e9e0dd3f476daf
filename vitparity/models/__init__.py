"""The project's own implementations of both encoders, registered with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel

from .configuration_onevision_encoder import (
    ARCHITECTURE_FIELDS,
    LlavaViTConfig,
    LlavaViTPackingConfig,
    OneVisionEncoderConfig,
    OneVisionEncoderPackingConfig,
)
from .modeling_onevision_encoder import LlavaViTModel, OneVisionEncoderModel, OneVisionEncoderPreTrainedModel
from .modeling_onevision_encoder_packing import LlavaViTPackingModel, OneVisionEncoderPackingModel

# model_type -> (config class, model class, side)
MODEL_TYPES = {
    "onevision_encoder": (OneVisionEncoderConfig, OneVisionEncoderModel, "hf"),
    "llava_vit": (LlavaViTConfig, LlavaViTModel, "hf"),
    "onevision_encoder_packing": (OneVisionEncoderPackingConfig, OneVisionEncoderPackingModel, "packing"),
    "llava_vit_packing": (LlavaViTPackingConfig, LlavaViTPackingModel, "packing"),
}

for _model_type, (_config_cls, _model_cls, _side) in MODEL_TYPES.items():
    AutoConfig.register(_model_type, _config_cls, exist_ok=True)
    AutoModel.register(_config_cls, _model_cls, exist_ok=True)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "MODEL_TYPES",
    "LlavaViTConfig",
    "LlavaViTModel",
    "LlavaViTPackingConfig",
    "LlavaViTPackingModel",
    "OneVisionEncoderConfig",
    "OneVisionEncoderModel",
    "OneVisionEncoderPackingConfig",
    "OneVisionEncoderPackingModel",
    "OneVisionEncoderPreTrainedModel",
]
