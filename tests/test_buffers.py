"""Non-persistent buffers after loading: restored from a fresh construction and named, refused with strict
buffers, an error when the checkpoint carries another value; float and integer buffers, remote code and built-in."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vitparity.buffers import check_buffers, fresh_buffers, non_persistent_buffers
from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.extract import extract_hf, extract_packing, prepare_sample
from vitparity.loading import ModelLoadError, load_model
from vitparity.media import load_image, load_video
from vitparity.models.layers import VisionRotary3D

from remote import buffered_checkpoint

BUFFERS = ["rotary.freqs_scale", "rotary.inv_freq_h", "rotary.inv_freq_t", "rotary.inv_freq_w",
           "rotary.position_axes"]
HEAD_DIM, THETA = 32, 10000.0  # the built-in tiny models
SOURCES = {"hf": BUILTIN_HF, "packing": BUILTIN_PACKING}

pytestmark = pytest.mark.usefixtures("isolated")  # checkpoint code imported from a tmp modules cache


def formula() -> dict[str, torch.Tensor]:
    """The buffers as the constructor of modeling_buffered.py computes them."""
    tables = dict(zip(("t", "h", "w"), VisionRotary3D(HEAD_DIM, THETA).inv_freqs()))
    return {**{f"rotary.inv_freq_{axis}": value for axis, value in tables.items()},
            "rotary.freqs_scale": torch.ones(()), "rotary.position_axes": torch.arange(3)}


def features(model: torch.nn.Module, side: str) -> list[torch.Tensor]:
    """Penultimate features of an image and a 4-frame video (64-frame context), float32 on the CPU."""
    samples = [prepare_sample(load_image(BUILTIN_MEDIA / "coffee_small.jpg"), patch_size=14),
               prepare_sample(load_video(BUILTIN_MEDIA / "coffee_zoom.mp4", num_frames=4), patch_size=14)]
    if side == "hf":
        return [extract_hf(model, sample) for sample in samples]
    return extract_packing(model, samples)


@pytest.mark.parametrize("side", ["hf", "packing"])
def test_buffers_left_wrong_by_loading_are_restored_and_named(side: str, tmp_path: Path) -> None:
    folder = buffered_checkpoint(side, tmp_path / side)
    loaded = load_model(folder, trust_remote_code=True)
    assert loaded.source == "remote code" and loaded.side == side
    assert loaded.restored_buffers == BUFFERS
    buffers = non_persistent_buffers(loaded.model)
    for name, value in formula().items():
        assert buffers[name].dtype == value.dtype and torch.equal(buffers[name], value), name
    builtin = load_model(SOURCES[side])
    assert builtin.restored_buffers == []
    for got, want in zip(features(loaded.model, side), features(builtin.model, side)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("side", ["hf", "packing"])
def test_uninitialised_buffers_are_restored(side: str, tmp_path: Path) -> None:
    """Buffers as transformers 5 leaves them (memory never written): restored, so the features are right."""
    loaded = load_model(buffered_checkpoint(side, tmp_path / side, initialised_wrong=False), trust_remote_code=True)
    assert set(loaded.restored_buffers) <= set(BUFFERS)
    for name, value in formula().items():
        assert torch.equal(non_persistent_buffers(loaded.model)[name], value), name
    for got, want in zip(features(loaded.model, side), features(load_model(SOURCES[side]).model, side)):
        assert torch.equal(got, want)


def test_strict_buffers_refuse_instead_of_restoring(tmp_path: Path) -> None:
    folder = buffered_checkpoint("packing", tmp_path / "packing")
    with pytest.raises(ModelLoadError) as error:
        load_model(folder, trust_remote_code=True, strict_buffers=True)
    message = str(error.value)
    assert str(folder) in message and "strict buffers" in message and "BufferedPackingModel" in message
    assert "rotary.freqs_scale: largest difference 6 at index 0 (7.0 vs 1.0)" in message
    assert "rotary.position_axes: largest difference 7 at index 0 (7 vs 0)" in message


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(("name", "saved", "shown"), [
    ("rotary.inv_freq_h", formula()["rotary.inv_freq_h"] * torch.tensor([1, 1, 1, 1.00001, 1, 1]),
     "largest difference 1.01e-07 at index 3"),
    ("rotary.position_axes", torch.tensor([0, 2, 1]), "largest difference 1 at index 1 (2 vs 1)"),
    ("rotary.freqs_scale", torch.tensor(2.0), "largest difference 1 at index 0 (2.0 vs 1.0)"),
], ids=["float", "integer", "scalar"])
def test_saved_buffer_that_is_not_the_constructors_value_is_an_error(name: str, saved: torch.Tensor, shown: str,
                                                                     strict: bool, tmp_path: Path) -> None:
    folder = buffered_checkpoint("hf", tmp_path / "hf", {name: saved})
    with pytest.raises(ModelLoadError) as error:
        load_model(folder, trust_remote_code=True, strict_buffers=strict)
    message = str(error.value)
    module, buffer = name.split(".")
    assert f"saved buffers refused: module {module} (BufferedRotary3D) buffer {buffer}:" in message
    assert shown in message and message.count("buffer ") == 1  # the right buffers are not blamed


def test_saved_buffers_equal_to_the_constructor_load(tmp_path: Path) -> None:
    """Carried buffers with the right values are not unexpected keys; loading left them unread, so they are
    restored (and named) like any other."""
    folder = buffered_checkpoint("hf", tmp_path / "hf", formula())
    loaded = load_model(folder, trust_remote_code=True)
    assert loaded.restored_buffers == BUFFERS
    for name, value in formula().items():
        assert torch.equal(non_persistent_buffers(loaded.model)[name], value)


def test_check_buffers_on_garbage_values(tmp_path: Path) -> None:
    """The values of the report: an int64 index of 9.4e13 and a float scale of 3.6e-43 are found and restored."""
    model = load_model(buffered_checkpoint("hf", tmp_path / "hf"), trust_remote_code=True).model
    model.rotary.position_axes.fill_(94_000_000_000_000)
    model.rotary.freqs_scale.fill_(3.6e-43)
    findings = check_buffers(model, {}, torch.float32)
    assert sorted(findings.restore) == ["rotary.freqs_scale", "rotary.position_axes"] and not findings.saved_wrong
    assert findings.differences["rotary.position_axes"].startswith("largest difference 9.4e+13 at index 0")
    assert findings.differences["rotary.freqs_scale"].startswith("largest difference 1 at index 0")
    assert torch.equal(findings.restore["rotary.position_axes"], torch.arange(3))


def test_fresh_construction_uses_the_load_dtype(tmp_path: Path) -> None:
    """Buffers the constructor makes in the default dtype come out as from_pretrained(dtype=...) makes them."""
    model = load_model(buffered_checkpoint("hf", tmp_path / "hf"), trust_remote_code=True,
                       dtype=torch.bfloat16).model
    assert fresh_buffers(model, torch.bfloat16)["rotary.freqs_scale"].dtype == torch.bfloat16
    assert model.rotary.freqs_scale.dtype == torch.bfloat16 and float(model.rotary.freqs_scale) == 1.0
    assert torch.get_default_dtype() == torch.float32
    assert not math.isnan(float(model.rotary.inv_freq_t[1]))


def test_builtin_models_have_no_buffer_to_check() -> None:
    for folder in SOURCES.values():
        model = load_model(folder).model
        assert non_persistent_buffers(model) == {}
        assert check_buffers(model, {}, torch.float32).restore == {}


def test_a_class_that_cannot_be_built_again_is_a_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args, **kwargs):
        raise RuntimeError("needs CUDA")

    monkeypatch.setattr("vitparity.buffers.fresh_buffers", fails)
    folder = buffered_checkpoint("hf", tmp_path / "hf")
    with pytest.raises(ModelLoadError, match=r"cannot build BufferedHFModel again on the CPU .*RuntimeError: needs CUDA"):
        load_model(folder, trust_remote_code=True)
