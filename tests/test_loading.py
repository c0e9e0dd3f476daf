"""Loading checkpoints that carry the release's RoPE buffers: accepted when they are the formula, refused otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.convert import ConversionError, convert_checkpoint
from vitparity.extract import extract_hf, extract_packing, prepare_sample
from vitparity.loading import ModelLoadError, load_model, rope_buffer_keys
from vitparity.media import load_image
from vitparity.models.layers import VisionRotary3D

SOURCES = {"hf": BUILTIN_HF, "packing": BUILTIN_PACKING}
HEAD_DIM, THETA = 32, 10000.0  # the built-in tiny models: hidden 64, 2 heads


def _with_tensors(source: Path, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of `source` whose model.safetensors also holds `tensors`."""
    folder = Path(shutil.copytree(source, folder))
    state = load_file(str(folder / "model.safetensors"))
    state.update(tensors)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _release_buffers(side: str) -> dict[str, torch.Tensor]:
    """The buffers as a release model with persistent RoPE buffers saves them (float32, the formula)."""
    return dict(zip(rope_buffer_keys(side), VisionRotary3D(HEAD_DIM, THETA).inv_freqs()))


def _features(loaded) -> torch.Tensor:
    sample = prepare_sample(load_image(BUILTIN_MEDIA / "coffee_small.jpg", patch_size=14), patch_size=14)
    if loaded.side == "hf":
        return extract_hf(loaded.model, sample)
    return extract_packing(loaded.model, [sample])[0]


def test_rope_buffer_key_names() -> None:
    assert rope_buffer_keys("hf") == ("video_rope.inv_freq_t", "video_rope.inv_freq_h", "video_rope.inv_freq_w")
    assert rope_buffer_keys("packing") == ("rotary_emb.inv_freq_t", "rotary_emb.inv_freq_h", "rotary_emb.inv_freq_w")


@pytest.mark.parametrize("side", ["hf", "packing"])
def test_saved_rope_buffers_equal_to_the_formula_load(side: str, tmp_path: Path) -> None:
    folder = _with_tensors(SOURCES[side], tmp_path / side, _release_buffers(side))
    loaded = load_model(folder)
    assert loaded.side == side
    assert torch.equal(_features(loaded), _features(load_model(SOURCES[side])))


@pytest.mark.parametrize("side", ["hf", "packing"])
def test_wrong_saved_rope_buffer_is_refused(side: str, tmp_path: Path) -> None:
    buffers = _release_buffers(side)
    key = rope_buffer_keys(side)[2]
    buffers[key] = buffers[key].clone()
    buffers[key][3] *= 1 + 1e-5  # ten times the tolerance, in one value
    folder = _with_tensors(SOURCES[side], tmp_path / side, buffers)
    with pytest.raises(ModelLoadError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder) in message and key in message and "largest difference" in message and "j=3" in message
    assert rope_buffer_keys(side)[0] not in message  # the correct ones are not blamed


def test_rope_buffers_saved_in_bfloat16_are_refused(tmp_path: Path) -> None:
    buffers = {key: value.to(torch.bfloat16) for key, value in _release_buffers("hf").items()}
    with pytest.raises(ModelLoadError, match=r"video_rope\.inv_freq_.*saved as torch\.bfloat16"):
        load_model(_with_tensors(BUILTIN_HF, tmp_path / "hf", buffers))


@pytest.mark.parametrize("extra", ["video_rope.inv_freq_x", "rotary_emb.inv_freq_t", "encoder.extra.weight"])
def test_other_unexpected_keys_stay_errors(extra: str, tmp_path: Path) -> None:
    """Any key but the hf side's own RoPE buffers is refused, including the packing side's buffer names."""
    buffers = {**_release_buffers("hf"), extra: torch.ones(8)}
    with pytest.raises(ModelLoadError, match=rf"unexpected keys \['{extra}'\]"):
        load_model(_with_tensors(BUILTIN_HF, tmp_path / "hf", buffers))


def test_convert_leaves_checked_rope_buffers_out(tmp_path: Path) -> None:
    folder = _with_tensors(BUILTIN_HF, tmp_path / "hf", _release_buffers("hf"))
    convert_checkpoint(folder, tmp_path / "packing")
    converted = load_file(str(tmp_path / "packing" / "model.safetensors"))
    assert converted.keys() == load_file(str(BUILTIN_PACKING / "model.safetensors")).keys()
    wrong = {key: value * 2 for key, value in _release_buffers("hf").items()}
    with pytest.raises(ConversionError, match="video_rope.inv_freq_t"):
        convert_checkpoint(_with_tensors(BUILTIN_HF, tmp_path / "wrong", wrong), tmp_path / "out")
