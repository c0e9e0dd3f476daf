"""`vitparity extract --codec`: each video's codec-style case in both feature files, its selection in metadata.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vitparity.builtin import BUILTIN_MEDIA
from vitparity.cli import main
from vitparity.features_io import HF_FILE, METADATA_FILE, PACKING_FILE

IMAGE = BUILTIN_MEDIA / "coffee_small.jpg"
VIDEO = BUILTIN_MEDIA / "coffee_zoom.mp4"  # 5 frames of 168x112: 8x12 patches per frame
OTHER_VIDEO = BUILTIN_MEDIA / "rocket_tilt.mp4"


def _extract(folder: Path, *extra: str) -> int:
    argv = ["extract", "--image1", IMAGE, "--video1", VIDEO, "--video2", OTHER_VIDEO, "--num_frames", "2",
            "--output_dir", folder, *extra]
    return main([str(arg) for arg in argv])


def _keys(folder: Path) -> dict[str, list[str]]:
    found = {}
    for name in (HF_FILE, PACKING_FILE):
        with np.load(folder / name) as data:
            found[name] = sorted(data.files)
    return found


def test_codec_adds_the_codec_keys_and_their_selection(tmp_path, capsys) -> None:
    assert _extract(tmp_path / "codec", "--codec") == 0
    out = capsys.readouterr().out
    keys = _keys(tmp_path / "codec")
    assert keys[HF_FILE] == keys[PACKING_FILE] == ["image1", "video1", "video1_codec", "video2", "video2_codec"]
    with np.load(tmp_path / "codec" / HF_FILE) as hf:
        assert hf["video1_codec"].shape == (1, 2 * 8 * 12, 64)  # 2 frames' worth of the video's 8x12 patches
    metadata = json.loads((tmp_path / "codec" / METADATA_FILE).read_text())
    selection = metadata["inputs"]["video1_codec"]["codec_selection"]
    assert selection["context_frames"] == 64 and selection["budget_frames"] == 2 and selection["tokens"] == 192
    assert selection["visible_indices"][:96] == list(range(96))  # the first frame whole
    assert "video1_codec" in out and "video2_codec" in out and "5 passed, 0 failed" in out
    assert main(["verify", "--features_dir", str(tmp_path / "codec")]) == 0
    assert "video2_codec" in capsys.readouterr().out


def test_without_the_flag_the_output_is_the_seed_keys_exactly(tmp_path) -> None:
    assert _extract(tmp_path / "plain") == 0
    keys = _keys(tmp_path / "plain")
    assert keys[HF_FILE] == keys[PACKING_FILE] == ["image1", "video1", "video2"]
    metadata = json.loads((tmp_path / "plain" / METADATA_FILE).read_text())
    assert set(metadata["inputs"]) == {"image1", "video1", "video2"}
    assert not any("codec_selection" in item for item in metadata["inputs"].values())
