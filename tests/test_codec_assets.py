"""Codec asset folders (the release's LLaVA pre-computation layout) as cases: loaded, checked, and run by the suite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from vitparity.codec import select_tokens
from vitparity.codec_assets import load_assets
from vitparity.media import MediaError, discover_media
from vitparity.suite.cases import collect_cases

from conftest import verdicts

P = 14
HB = WB = 3
CONTEXT = 16
NUM_IMAGES = 2


def write_asset_folder(folder: Path, seed: int = 0) -> Path:
    """An asset folder as the release writes it, from random square frames: the codec-style selection of
    NUM_IMAGES frames' worth of tokens out of CONTEXT frames, its mosaics as JPEG, positions, indices, frame ids."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(CONTEXT, HB * P, WB * P, 3), dtype=np.uint8)
    selection = select_tokens(frames, P, NUM_IMAGES)
    folder.mkdir(parents=True)
    per = HB * WB
    for i in range(NUM_IMAGES):
        mosaic = np.zeros((HB * P, WB * P, 3), dtype=np.uint8)
        for j, (t, h, w) in enumerate(selection.positions[i * per:(i + 1) * per].tolist()):
            r, c = divmod(j, WB)
            mosaic[r * P:(r + 1) * P, c * P:(c + 1) * P] = frames[t, h * P:(h + 1) * P, w * P:(w + 1) * P]
        cv2.imwrite(str(folder / f"mosaic_{i:03d}.jpg"), cv2.cvtColor(mosaic, cv2.COLOR_RGB2BGR))
    np.save(folder / "positions_thw.npy", selection.positions.astype(np.int32))
    np.save(folder / "visible_indices.npy", selection.visible_indices.astype(np.int64))
    np.save(folder / "frame_ids.npy", np.arange(CONTEXT, dtype=np.int32) * 3)
    meta = {"seq_len_frames": CONTEXT, "num_images": NUM_IMAGES, "square_size": HB * P, "patch_size": P, "hb": HB,
            "wb": WB, "S_total": per * NUM_IMAGES, "K_total": per * NUM_IMAGES, "keep_first_full": True,
            "topk_mode": "global"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_a_folder_loads_as_mosaics_with_their_positions(tmp_path) -> None:
    media = load_assets(write_asset_folder(tmp_path / "clip"), patch_size=P)
    assert media.frames.shape == (NUM_IMAGES, HB * P, WB * P, 3) and media.positions.shape == (NUM_IMAGES * 9, 3)
    assert media.metadata["codec_assets"]["topk_mode"] == "global"


def _npy(name: str, edit):
    def change(folder: Path) -> None:
        array = np.load(folder / name)
        np.save(folder / name, edit(array))
    return change


def _meta(**fields):
    def change(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, **fields}))
    return change


def _set_row(value):
    def edit(array):
        array = array.copy()
        array[3] = value
        return array
    return edit


BROKEN = {
    "token count": (_npy("positions_thw.npy", lambda a: a[:-1]), "positions_thw.npy",
                    "the positions must match the mosaics' 2 x 3 x 3 = 18 tokens"),
    "outside the grid": (_npy("positions_thw.npy", _set_row([1, 3, 0])), "positions_thw.npy",
                         "row 3 (t, h, w) = (1, 3, 0) lies outside the grid"),
    "outside the context": (_npy("positions_thw.npy", _set_row([CONTEXT, 0, 0])), "positions_thw.npy",
                            "lies outside the grid t < 16 (seq_len_frames)"),
    "indices disagree": (_npy("visible_indices.npy", _set_row(0)), "visible_indices.npy",
                         "row 3 is 0, but positions_thw.npy row 3"),
    "patch size": (_meta(patch_size=16), "meta.json", "patch_size 16 differs from the model's 14"),
    "missing mosaic": (lambda f: (f / "mosaic_001.jpg").unlink(), "mosaic_001.jpg", "missing"),
    "missing file": (lambda f: (f / "frame_ids.npy").unlink(), "frame_ids.npy", "missing"),
    "unreadable": (lambda f: (f / "visible_indices.npy").write_bytes(b"not numpy"), "visible_indices.npy",
                   "unreadable"),
    "bad meta": (lambda f: (f / "meta.json").write_text("{"), "meta.json", "unreadable"),
    "mosaic size": (lambda f: cv2.imwrite(str(f / "mosaic_000.jpg"), np.zeros((28, 42, 3), np.uint8)),
                    "mosaic_000.jpg", "42x28 pixels, expected 42x42"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_folder_is_an_error_naming_the_file(broken, tmp_path) -> None:
    change, name, says = BROKEN[broken]
    folder = write_asset_folder(tmp_path / "clip")
    change(folder)
    with pytest.raises(MediaError) as error:
        load_assets(folder, patch_size=P)
    assert error.value.path == str(folder / name) and says in error.value.reason


def test_asset_folders_are_cases_and_other_subfolders_stay_errors(tmp_path) -> None:
    write_asset_folder(tmp_path / "media" / "clip")
    shutil.copy(Path(__file__).parent / "media" / "clip.mp4", tmp_path / "media" / "clip.mp4")
    cases = {case.id: case for case in collect_cases([tmp_path / "media"], patch_size=P, align="crop", num_frames=8,
                                                     codec_frames=8)}
    assert set(cases) == {"assets-clip", "video-clip.mp4", "codec-clip.mp4"}
    assert cases["assets-clip"].kind == "assets" and cases["assets-clip"].tokens == 18
    (tmp_path / "media" / "notes").mkdir()
    with pytest.raises(MediaError, match="notes/"):
        discover_media(tmp_path / "media")
    with pytest.raises(MediaError, match="notes/"):
        collect_cases([tmp_path / "media"], patch_size=P, align="crop", num_frames=8)


def test_the_suite_runs_an_asset_folder_and_fails_a_broken_one_by_name(suite, tmp_path) -> None:
    media = tmp_path / "more"
    write_asset_folder(media / "clip")
    good = suite.run(f"--media={media}", "-m", "codec and not golden", "-k", "assets", "-p", "no:randomly")
    assert good.ret == 0, good.stdout.str()[-3000:]
    # The case's parity row, its whole-output rows (test_outputs: last_hidden_state, pooler_output) and its row of an
    # hf batch (test_batch), all passing.
    assert verdicts(good.stdout.str()) == {name: "PASS" for name in (
        "assets-clip", "last_hidden_state/assets-clip", "pooler_output/assets-clip", "batch/assets-clip")}
    _npy("visible_indices.npy", _set_row(0))(media / "clip")
    bad = suite.run(f"--media={media}", "-m", "codec and not golden", "-k", "assets", "-p", "no:randomly")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR  # checked with every media file, before any model loads
    assert f"\n  {media / 'clip' / 'visible_indices.npy'}: row 3 is 0" in bad.stderr.str()
