"""Weight conversion between the non-packing (HF) and the packing layout of the same encoder.

HF -> packing: `embeddings.patch_embedding` -> `patch_embed.proj`; per layer q, k, v projections are fused
into `self_attn.qkv` (concatenated in that order along the output dimension) and `out_proj` becomes
`proj`; the release's RoPE buffers, where a state dict carries them, `video_rope.inv_freq_{t,h,w}` ->
`rotary_emb.inv_freq_{t,h,w}`. Every other key is identical. The reverse splits `qkv` in three equal parts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .loading import (ModelLoadError, read_config, rope_buffer_keys, saved_rope_buffer_problems, weight_files,
                      weight_problems)
from .models import MODEL_TYPES, OneVisionEncoderConfig, OneVisionEncoderModel, OneVisionEncoderPackingConfig
from .models import OneVisionEncoderPackingModel

_LAYER_ATTN = re.compile(r"^(encoder\.layers\.\d+\.self_attn)\.(q_proj|k_proj|v_proj|out_proj|qkv|proj)\.(weight|bias)$")
_PATCH = {"hf": "embeddings.patch_embedding.weight", "packing": "patch_embed.proj.weight"}
_CONFIG_ONLY_FIELDS = {"hf": ("rope_temporal_size",), "packing": ("temporal_patch_size", "spatial_merge_size")}
_ROPE_TO_PACKING = dict(zip(rope_buffer_keys("hf"), rope_buffer_keys("packing")))
_ROPE_TO_HF = {packing: hf for hf, packing in _ROPE_TO_PACKING.items()}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the folder and the offending keys."""


def hf_to_packing_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse an HF-layout state dict into the packing layout (inputs are not modified)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _LAYER_ATTN.match(key)
        if key == _PATCH["hf"]:
            out[_PATCH["packing"]] = value
        elif key in _ROPE_TO_PACKING:
            out[_ROPE_TO_PACKING[key]] = value
        elif match and match.group(2) in ("q_proj", "k_proj", "v_proj"):
            pending.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        elif match and match.group(2) == "out_proj":
            out[f"{match.group(1)}.proj.{match.group(3)}"] = value
        else:
            out[key] = value
    for (prefix, kind), parts in pending.items():
        missing = [name for name in ("q_proj", "k_proj", "v_proj") if name not in parts]
        if missing:
            raise ConversionError(f"{prefix}: cannot fuse qkv.{kind}, missing {', '.join(missing)}.{kind}")
        out[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def packing_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and split a packing-layout state dict into the HF layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _LAYER_ATTN.match(key)
        if key == _PATCH["packing"]:
            out[_PATCH["hf"]] = value
        elif key in _ROPE_TO_HF:
            out[_ROPE_TO_HF[key]] = value
        elif match and match.group(2) == "qkv":
            if value.shape[0] % 3:
                raise ConversionError(f"{key}: first dimension {value.shape[0]} is not divisible by 3")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{match.group(1)}.{name}.{match.group(3)}"] = part.clone()
        elif match and match.group(2) == "proj":
            out[f"{match.group(1)}.out_proj.{match.group(3)}"] = value
        else:
            out[key] = value
    return out


def convert_config(config: OneVisionEncoderConfig | OneVisionEncoderPackingConfig):
    """The config of the other layout, with every shared field copied."""
    source_side = "packing" if isinstance(config, OneVisionEncoderPackingConfig) else "hf"
    target_cls = OneVisionEncoderConfig if source_side == "packing" else OneVisionEncoderPackingConfig
    fields = config.to_dict()
    for name in ("model_type", "architectures", "auto_map", "transformers_version", *_CONFIG_ONLY_FIELDS[source_side]):
        fields.pop(name, None)
    return target_cls(**fields)


def read_checkpoint(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json fields and the full state dict (single or sharded safetensors) of a checkpoint folder."""
    folder = Path(folder)
    try:
        config = read_config(folder)
        files = weight_files(folder)
    except ModelLoadError as err:
        raise ConversionError(str(err)) from err
    if not files:
        raise ConversionError(f"{folder}: no safetensors weights in the folder")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except Exception as err:  # safetensors raises several types for truncated or corrupt files
            raise ConversionError(f"{path}: cannot read safetensors weights ({err})") from err
    return config, state


def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """Raise ConversionError unless `state` has exactly the model's keys and shapes."""
    problems = weight_problems({k: tuple(v.shape) for k, v in state.items()}, model)
    if problems:
        raise ConversionError(f"{where}: " + "; ".join(problems))


def convert_checkpoint(source: str | Path, output: str | Path) -> Path:
    """Convert a checkpoint folder to the other layout and save it (config.json, model.safetensors and
    preprocessor_config.json: the source's own, checked, or one with the CLIP defaults when it has none).

    Saved RoPE buffers of the release (`loading.rope_buffer_keys`) are checked against the formula and left out.
    """
    from .pair import PREPROCESSOR_FILE, PairError, preprocessor_config, read_normalization

    source, output = Path(source), Path(output)
    config_fields, state = read_checkpoint(source)
    model_type = config_fields.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{source}: model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    config_cls, model_cls, side = MODEL_TYPES[model_type]
    config = config_cls.from_dict({k: v for k, v in config_fields.items() if k != "auto_map"})
    rope_keys = [key for key in rope_buffer_keys(side) if key in state]
    problems = saved_rope_buffer_problems(source, rope_keys, config)
    if problems:
        raise ConversionError(f"{source}: saved RoPE buffers refused: " + "; ".join(problems))
    state = {key: value for key, value in state.items() if key not in rope_keys}
    try:
        normalization = read_normalization(source)
    except PairError as err:
        raise ConversionError(str(err)) from err
    with torch.device("meta"):
        check_state_dict(state, model_cls(config), str(source))
    target_config = convert_config(config)
    target_cls = OneVisionEncoderPackingModel if side == "hf" else OneVisionEncoderModel
    target_state = hf_to_packing_state_dict(state) if side == "hf" else packing_to_hf_state_dict(state)
    with torch.device("meta"):
        target = target_cls(target_config)
    check_state_dict(target_state, target, f"{source} (converted)")
    target.load_state_dict(target_state, strict=True, assign=True)
    output.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(output)
    if (source / PREPROCESSOR_FILE).is_file():  # kept byte for byte: its other settings belong to the release
        text = (source / PREPROCESSOR_FILE).read_text()
    else:
        text = json.dumps(preprocessor_config(normalization), indent=2) + "\n"
    (output / PREPROCESSOR_FILE).write_text(text)
    _usual_file_mode(output)
    return output


def _usual_file_mode(folder: Path) -> None:
    """Give every file in `folder` the mode a plain `open()` gives (0666 less the umask): `save_pretrained` writes
    its weights through a private temporary file (0600), which another user or a CI job under another account
    could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
