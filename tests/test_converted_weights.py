"""The converted-weights check on state dicts that carry the release's RoPE buffers: mapped where both models keep
them (and compared exactly), left out with the reason where one model alone keeps them, never a false alarm."""

from __future__ import annotations

import pytest
import torch

from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING
from vitparity.convert import hf_to_packing_state_dict, packing_to_hf_state_dict
from vitparity.models import OneVisionEncoderModel, OneVisionEncoderPackingModel
from vitparity.outputs import converted_weights


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return OneVisionEncoderModel.from_pretrained(BUILTIN_HF), OneVisionEncoderPackingModel.from_pretrained(BUILTIN_PACKING)


def keep_rope_tables(model: torch.nn.Module, module: str, values: float | None = None) -> None:
    """Give `model` a submodule `module` holding persistent `inv_freq_{t,h,w}` buffers (the model's own tables, or
    `values` everywhere), as a release copy patched to save them does."""
    holder = torch.nn.Module()
    for axis, table in zip("thw", model.rotary.inv_freqs()):
        holder.register_buffer(f"inv_freq_{axis}", table if values is None else torch.full_like(table, values))
    setattr(model, module, holder)


def test_the_converter_maps_the_rope_buffers_both_ways() -> None:
    hf = {f"video_rope.inv_freq_{axis}": torch.full((2,), float(i)) for i, axis in enumerate("thw")}
    packing = hf_to_packing_state_dict(hf)
    assert sorted(packing) == [f"rotary_emb.inv_freq_{axis}" for axis in "htw"]
    assert packing_to_hf_state_dict(packing).keys() == hf.keys()


def test_buffers_both_models_keep_are_mapped_and_compared(pair) -> None:
    hf, packing = pair
    keep_rope_tables(hf, "video_rope")
    keep_rope_tables(packing, "rotary_emb")
    try:
        checked = converted_weights(hf, packing)
        assert checked.problems == [] and checked.left_out == []
        keep_rope_tables(packing, "rotary_emb", values=0.5)  # the same keys, other values: a conversion fault
        problems = converted_weights(hf, packing).problems
        assert [line.split(":")[0] for line in problems] == [f"rotary_emb.inv_freq_{axis}" for axis in "htw"]
    finally:
        del hf.video_rope, packing.rotary_emb


@pytest.mark.parametrize("side", ["hf", "packing"])
def test_a_buffer_one_model_alone_keeps_is_left_out_with_the_reason(pair, side) -> None:
    hf, packing = pair
    model, module = (hf, "video_rope") if side == "hf" else (packing, "rotary_emb")
    keep_rope_tables(model, module)
    try:
        checked = converted_weights(hf, packing)
    finally:
        delattr(model, module)
    assert checked.problems == []
    assert len(checked.left_out) == 3 and all(f"only the {side} model keeps" in line for line in checked.left_out)
    assert all("test_loaded_weights" in line for line in checked.left_out)


def test_a_parameter_one_model_lacks_is_still_a_problem(pair) -> None:
    hf, packing = pair
    packing.extra = torch.nn.Linear(2, 2)
    try:
        problems = converted_weights(hf, packing).problems
    finally:
        del packing.extra
    assert problems == ["extra.bias: in the packing model, no hf tensor maps to it",
                        "extra.weight: in the packing model, no hf tensor maps to it"]
