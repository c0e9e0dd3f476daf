"""The codec-style selection (vitparity.codec) and the three ways of calling the models on it agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING
from vitparity.codec import mosaic, permuted, prepare_codec_sample, residual_energy, select_tokens, token_permutation
from vitparity.extract import extract_hf, extract_packing, patchify
from vitparity.media import Media
from vitparity.compare import compare_features
from vitparity.loading import load_model

P = 14


def frames_with_changes(t: int, h: int, w: int, changes: dict[tuple[int, int, int], int]) -> np.ndarray:
    """uint8 RGB (t, h*P, w*P, 3) frames of grey 100; `changes` (t, h, w) -> a value that patch holds from frame t
    on (so it changes from frame t-1 to t only)."""
    frames = np.full((t, h * P, w * P, 3), 100, dtype=np.uint8)
    for (ti, hi, wi), value in changes.items():
        frames[ti:, hi * P:(hi + 1) * P, wi * P:(wi + 1) * P] = value
    return frames


def test_first_frame_whole_then_the_largest_changes_sorted_by_t_h_w() -> None:
    frames = frames_with_changes(5, 2, 3, {(3, 1, 2): 200, (1, 0, 1): 180, (4, 0, 0): 90})
    selection = select_tokens(frames, P, budget_frames=2)
    rows = [tuple(row) for row in selection.positions.tolist()]
    assert len(rows) == 2 * 6
    assert rows[:6] == [(0, h, w) for h in range(2) for w in range(3)]  # the first frame, whole
    assert {(3, 1, 2), (1, 0, 1), (4, 0, 0)} <= set(rows[6:])  # every changed patch kept
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    # ties (every other patch: no change) go to the lower (t, h, w): frame 1's first patches
    assert rows[6:] == sorted({(3, 1, 2), (1, 0, 1), (4, 0, 0), (1, 0, 0), (1, 0, 2), (1, 1, 0)})
    h, w = 2, 3
    assert selection.visible_indices.tolist() == [t * h * w + hi * w + wi for t, hi, wi in rows]


def test_energy_is_normalised_per_frame() -> None:
    """A small change in a quiet frame scores as high as a large one in another frame (each frame / its p95 or max)."""
    frames = frames_with_changes(3, 2, 2, {(1, 0, 0): 110, (2, 1, 1): 250})
    energy = residual_energy(frames, P)
    assert energy[0].max() == 0
    assert energy[1, 0, 0] == pytest.approx(energy[2, 1, 1]) and energy[1, 0, 0] > 0  # raw changes: 10 and 150
    assert energy[1].sum() == energy[1, 0, 0] and energy[2].sum() == energy[2, 1, 1]


def test_static_video_keeps_the_first_frames_and_a_short_file_repeats_frames() -> None:
    frames = np.repeat(frames_with_changes(1, 2, 2, {}), 64, axis=0)  # one frame repeated: no change anywhere
    selection = select_tokens(frames, P, budget_frames=8)
    assert selection.positions[:, 0].tolist() == [t for t in range(8) for _ in range(4)]


@pytest.mark.parametrize("budget", [0, 6])
def test_a_budget_outside_the_context_is_refused(budget) -> None:
    with pytest.raises(ValueError, match="does not fit 5 context frames"):
        select_tokens(frames_with_changes(5, 2, 2, {}), P, budget_frames=budget)


def test_digest_names_a_changed_selection() -> None:
    one = select_tokens(frames_with_changes(4, 2, 2, {(2, 1, 1): 200}), P, budget_frames=2)
    other = select_tokens(frames_with_changes(4, 2, 2, {(3, 1, 1): 200}), P, budget_frames=2)
    assert one.digest != other.digest
    assert one.metadata()["indices_sha256"] == one.digest and one.metadata()["budget_frames"] == 2


def test_mosaic_lays_the_kept_patches_out_row_major_in_order() -> None:
    frames = frames_with_changes(6, 2, 3, {(2, 0, 1): 10, (5, 1, 0): 20, (3, 1, 2): 30})
    selection = select_tokens(frames, P, budget_frames=2)
    context = torch.arange(np.prod((3, 6, 2 * P, 3 * P)), dtype=torch.float32).reshape(3, 6, 2 * P, 3 * P)
    laid = mosaic(context, selection, P)
    assert laid.shape == (3, 2, 2 * P, 3 * P)
    for k, (t, h, w) in enumerate(selection.positions.tolist()):
        i, j = divmod(k, 6)
        r, c = divmod(j, 3)
        assert torch.equal(laid[:, i, r * P:(r + 1) * P, c * P:(c + 1) * P],
                           context[:, t, h * P:(h + 1) * P, w * P:(w + 1) * P])


@pytest.fixture(scope="module")
def tiny_models():
    return load_model(BUILTIN_HF).model, load_model(BUILTIN_PACKING).model


@pytest.fixture(scope="module")
def codec_sample():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(64, 2 * P, 3 * P, 3), dtype=np.uint8)
    media = Media("synthetic.mp4", "video", frames, {"width": 3 * P, "height": 2 * P})
    return prepare_codec_sample(media, patch_size=P, budget_frames=3, name="codec-synthetic")


def test_the_three_calls_agree(tiny_models, codec_sample) -> None:
    """hf sparse visible_indices, hf mosaic with patch_positions and packing: the same features, token for token."""
    hf, packing = tiny_models
    sparse = extract_hf(hf, codec_sample, path="context")
    explicit = extract_hf(hf, codec_sample, path="positions")
    packed = extract_packing(packing, [codec_sample])[0]
    assert sparse.shape == (3 * 6, hf.config.hidden_size)
    for a, b in ((sparse, explicit), (explicit, packed)):
        assert compare_features(a, b, name="paths", threshold=0.9999).passed


def test_a_shuffled_order_gives_the_same_features_put_back(tiny_models, codec_sample) -> None:
    hf, packing = tiny_models
    order = token_permutation(codec_sample.num_tokens)
    shuffled, restore = permuted(codec_sample, order), torch.argsort(order)
    assert torch.equal(patchify(shuffled.pixels, P), patchify(codec_sample.pixels, P)[order])
    for path in ("context", "positions"):
        assert compare_features(extract_hf(hf, codec_sample, path=path), extract_hf(hf, shuffled, path=path)[restore],
                                name=path, threshold=0.9999).passed
    assert compare_features(extract_packing(packing, [codec_sample])[0],
                            extract_packing(packing, [shuffled])[0][restore], name="packing", threshold=0.9999).passed


def test_a_changed_selection_is_named_apart_from_a_changed_model() -> None:
    from vitparity.provenance_diff import provenance_diff

    old = {"case": "codec-a.mp4", "codec_selection": {"budget_frames": 8, "indices_sha256": "0123456789abcdef"}}
    new = {"case": "codec-a.mp4", "codec_selection": {"budget_frames": 8, "indices_sha256": "fedcba9876543210"}}
    cause = provenance_diff(old, new).likely_cause()
    assert cause is not None and "codec-style selection kept other tokens" in cause and "not the model" in cause
    budget = provenance_diff(old, {**old, "codec_selection": {**old["codec_selection"], "budget_frames": 4}})
    assert budget.likely_cause() is None  # a setting changed: not an environment cause


def test_codec_cases_are_always_on(suite) -> None:
    """One codec-style case per video, none for an image; `-m "not codec"` leaves them out."""
    ids = suite.run("--collect-only", "-q", "-k", "test_parity").stdout.str()
    assert "test_parity[codec-coffee_zoom.mp4]" in ids and "test_parity[codec-coffee_small.jpg]" not in ids
    off = suite.run("--collect-only", "-q", "-k", "test_parity", "-m", "not codec").stdout.str()
    assert "test_parity[video-coffee_zoom.mp4]" in off and "codec-" not in off