"""metadata.json sizes: `width` / `height` are the size the model saw and `orig_width` / `orig_height` the native
size, as the release's extraction tool writes them; verify reads that layout, vitparity's older one (`width` native,
`aligned_width` seen) and one with neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitparity.cli import main
from vitparity.extract import input_sizes, prepare_sample
from vitparity.features_io import describe_metadata, input_resolution, write_features
from vitparity.builtin import BUILTIN_MEDIA
from vitparity.media import load_image

RELEASE_TOOL = {"path": "images/1.jpg", "orig_width": 1189, "orig_height": 790, "width": 1190, "height": 798}
OLDER_VITPARITY = {"path": "1.jpg", "width": 1189, "height": 790, "scaled_width": 1189, "scaled_height": 790,
                   "aligned_width": 1190, "aligned_height": 798}


@pytest.mark.parametrize(("item", "expected"), [
    (RELEASE_TOOL, ("1190x798", "1189x790")),
    (OLDER_VITPARITY, ("1190x798", "1189x790")),
    ({"width": 224, "height": 224}, ("224x224", "?x?")),
    ({}, ("?x?", "?x?")),
], ids=["release-tool", "older-vitparity", "sizes-only", "nothing"])
def test_input_resolution_reads_every_layout(item: dict, expected: tuple[str, str]) -> None:
    assert input_resolution(item) == expected


@pytest.mark.parametrize("align", ["crop", "resize"])
def test_written_sizes_are_the_model_input(align: str) -> None:
    image = load_image(BUILTIN_MEDIA / "coffee_small.jpg", align=align)  # 105 x 70
    meta = prepare_sample(image, patch_size=14).metadata
    width = {"crop": 98, "resize": 112}[align]
    assert (meta["width"], meta["height"], meta["orig_width"], meta["orig_height"]) == (width, 70, 105, 70)
    assert (meta["aligned_width"], meta["scaled_width"]) == (width, 105)  # vitparity's own keys, kept beside
    assert meta["tensor_shape"][-1] == meta["width"]
    assert input_sizes({"width": 5, "height": 6, "kind": "image"}, 14, 28) == {
        "width": 14, "height": 28, "orig_width": 5, "orig_height": 6, "kind": "image"}


@pytest.mark.parametrize(("item", "line"), [
    (RELEASE_TOOL, "    Resolution: 1190x798 (native 1189x790)"),
    (OLDER_VITPARITY, "    Resolution: 1190x798 (native 1189x790)"),
    ({"path": "a.jpg", "orig_width": 224, "orig_height": 224, "width": 224, "height": 224}, "    Resolution: 224x224"),
], ids=["release-tool", "older-vitparity", "aligned"])
def test_verify_prints_the_size_seen_of_either_tools_folder(item: dict, line: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    features = np.ones((4, 8), dtype=np.float32)
    write_features(tmp_path, {"image1": features[None]}, {"image1": features},
                   {"hf_model_path": "hf", "packing_model_path": "packing", "inputs": {"image1": item}})
    assert main(["verify", "--features_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert line in out.splitlines()
    assert describe_metadata({"inputs": {"image1": item}})[-1] == line


def test_frames_made_in_memory_have_the_size_seen_as_native() -> None:
    assert input_sizes({"kind": "image"}, 14, 28) == {"kind": "image", "width": 14, "height": 28, "orig_width": 14,
                                                      "orig_height": 28}
