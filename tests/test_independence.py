"""The companion swap catches any dependence of a packed sample on its neighbours, down to one bit.

`neighbour_leak_1e-6` (tests/faults) adds 1e-6 x the other samples' mean token to each sample: every cosine
comparison the suite makes passes it, the swap does not. Both attention implementations of the packing model
("sdpa", "eager") are bit-exact on the clean model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faults import build_variant
from faults.modeling_planted import PlantedPackingModel
from vitparity.builtin import BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.compare import DEFAULT_THRESHOLD, NEIGHBOUR_MIN_COS, compare_features
from vitparity.extract import extract_packing, prepare_sample
from vitparity.independence import alternate_halves, companion_swap, swap_companions
from vitparity.loading import load_model
from vitparity.media import load_media

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEDIA = ("coffee_small.jpg", "coffee_zoom.mp4", "rocket_portrait.jpg")


def _pack(dtype: torch.dtype):
    return [prepare_sample(load_media(BUILTIN_MEDIA / name, num_frames=2), patch_size=14, dtype=dtype, name=name)
            for name in MEDIA]


def _planted(name: str, dtype: torch.dtype, root: Path) -> torch.nn.Module:
    return PlantedPackingModel.from_pretrained(build_variant(name, root), dtype=dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_clean_model_is_bit_exact(implementation: str, dtype: str) -> None:
    model = load_model(BUILTIN_PACKING, dtype=DTYPES[dtype]).model
    model.set_attn_implementation(implementation)
    pack = _pack(DTYPES[dtype])
    results = [r for kept in alternate_halves(len(pack)) for r in companion_swap(model, pack, kept)]
    assert sorted(r.index for r in results) == list(range(len(pack)))  # two swaps query every sample
    for result in results:
        assert result.passed and result.identical and result.max_abs == 0.0, result.format()
        assert result.companions_changed and result.backend == implementation and result.dtype == dtype
        assert "PASS: features bit-identical" in result.format()


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_catches_a_leak_the_thresholds_miss(dtype: str, tmp_path: Path) -> None:
    model = _planted("neighbour_leak_1e-6", DTYPES[dtype], tmp_path)
    pack = _pack(DTYPES[dtype])
    for index, sample in enumerate(pack):
        alone = extract_packing(model, [sample])[0]
        packed = extract_packing(model, pack)[index]
        swapped = extract_packing(model, swap_companions(pack, [index]))[index]
        for threshold in (DEFAULT_THRESHOLD, NEIGHBOUR_MIN_COS[dtype]):  # what the suite compares today
            for a, b in ((alone, packed), (packed, swapped)):
                assert compare_features(a, b, threshold=threshold).passed
        (result,) = companion_swap(model, pack, [index])
        assert not result.identical and not result.passed, result.format()
        assert 0.0 < result.max_abs < 1e-4
        assert "FAIL: features changed by up to" in result.format()


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_catches_cross_sample_attention(dtype: str, tmp_path: Path) -> None:
    model = _planted("cross_sample_attention", DTYPES[dtype], tmp_path)
    for result in companion_swap(model, _pack(DTYPES[dtype]), [0, 2]):  # each sees its swapped neighbour
        assert not result.passed and result.max_abs > 1.0, result.format()
    (result,) = companion_swap(model, _pack(DTYPES[dtype]), [1])
    assert dict(result.properties())["companion_swap[coffee_zoom.mp4] identical"] == "no"


def test_swap_replaces_only_the_companions() -> None:
    pack = _pack(torch.float32)
    swapped = swap_companions(pack, [1], seed=3)
    assert swapped[1] is pack[1]
    for before, after in ((pack[0], swapped[0]), (pack[2], swapped[2])):
        assert after.pixels.shape == before.pixels.shape and after.grid == before.grid
        assert after.frame_positions == before.frame_positions and after.pixels.dtype == before.pixels.dtype
        assert not torch.equal(after.pixels, before.pixels)
    assert torch.equal(swap_companions(pack, [1], seed=3)[0].pixels, swapped[0].pixels)  # deterministic


def test_swap_that_changes_nothing_fails() -> None:
    """A model whose output ignores its input cannot pass: the swap must visibly change the companions."""

    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = type("Config", (), {"patch_size": 14})()

        def forward(self, hidden_states, grid_thw, patch_positions, output_hidden_states):
            zeros = torch.zeros(hidden_states.shape[0], 4)
            return (zeros, (zeros, zeros, zeros))

    (result,) = companion_swap(Constant(), _pack(torch.float32), [0])
    assert result.identical and not result.passed and result.backend == "n/a"
    assert "the swap did not change the other samples' features" in result.format()


def test_swap_needs_a_pack() -> None:
    model = load_model(BUILTIN_PACKING).model
    pack = _pack(torch.float32)
    with pytest.raises(ValueError, match="at least 2 samples"):
        companion_swap(model, pack[:1], [0])
    for kept in ([3], [], [0, 1, 2]):
        with pytest.raises(IndexError, match="must be some, not all, of the pack's 0..2"):
            companion_swap(model, pack, kept)
