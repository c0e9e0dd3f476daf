"""Checkpoints that run their own code (remote code) the way the release's classes do: a config class without
`rope_temporal_size`, and RoPE tables, a scale and axis indices kept as non-persistent buffers, which transformers 5
leaves uninitialised when the checkpoint does not carry them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING

MODULE = Path(__file__).with_name("modeling_buffered.py")
CLASSES = {"hf": ("BufferedHFConfig", "BufferedHFModel"), "packing": ("BufferedPackingConfig", "BufferedPackingModel")}
MODEL_TYPES = {"hf": "buffered_onevision_encoder", "packing": "buffered_onevision_encoder_packing"}
SOURCES = {"hf": BUILTIN_HF, "packing": BUILTIN_PACKING}


def buffered_checkpoint(side: str, folder: Path, saved: dict[str, torch.Tensor] | None = None, *,
                        initialised_wrong: bool = True) -> Path:
    """The built-in tiny checkpoint of `side` as a remote-code checkpoint of `modeling_buffered.py` (config.json
    without rope_temporal_size), its weights plus the tensors `saved` (buffers the checkpoint carries).

    `initialised_wrong`: loading leaves 7 in every buffer (`buffers_initialised_wrong`); otherwise whatever memory
    transformers gives them, which may by chance hold the right values."""
    folder = Path(shutil.copytree(SOURCES[side], folder))
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_temporal_size", None)
    config["buffers_initialised_wrong"] = initialised_wrong
    config_class, model_class = CLASSES[side]
    config["model_type"] = MODEL_TYPES[side]
    config["auto_map"] = {"AutoConfig": f"{MODULE.stem}.{config_class}", "AutoModel": f"{MODULE.stem}.{model_class}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(MODULE, folder / MODULE.name)
    if saved:
        weights = load_file(str(folder / "model.safetensors"))
        weights.update(saved)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


RELEASE_CODE = Path(__file__).with_name("release")
RELEASE_CLASSES = {
    "hf": ("configuration_onevision_encoder.OneVisionEncoderConfig", "modeling_onevision_encoder.OneVisionEncoderModel"),
    "packing": ("configuration_onevision_encoder.OneVisionEncoderPackingConfig",
                "modeling_onevision_encoder_packing.OneVisionEncoderPackingModel"),
}


def release_checkpoint(side: str, folder: Path, edits: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """The built-in tiny checkpoint of `side` with the release-format code of tests/remote/release (config.json
    `auto_map`, the three code files copied in, the packing file importing flash-attn when imported).

    `edits`: file name -> (old, new) text replacements planted in that file's copy (each must occur)."""
    return add_release_code(Path(shutil.copytree(SOURCES[side], folder)), side, edits)


def add_release_code(folder: Path, side: str, edits: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """Make a checkpoint folder of vitparity's `side` class ("hf" or "packing") one that ships the release-format
    code (see `release_checkpoint`); its weights are left as they are. Returns the folder."""
    config = json.loads((folder / "config.json").read_text())
    config_class, model_class = RELEASE_CLASSES[side]
    config.pop("rope_temporal_size", None)  # as a release config class without the field writes it
    config["auto_map"] = {"AutoConfig": config_class, "AutoModel": model_class}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for source in sorted(RELEASE_CODE.glob("*.py")):
        text = source.read_text()
        for old, new in (edits or {}).get(source.name, []):
            if old not in text:
                raise ValueError(f"{source.name}: {old!r} not found: nothing planted")
            text = text.replace(old, new)
        (folder / source.name).write_text(text)
    return folder
