"""The `resize` alignment policy gives the release tool's pixels: images through Pillow's bicubic filter, video
frames through OpenCV's INTER_AREA, each to the next multiple of the patch size. The references are computed here
from the files, the way that tool reads them."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from vitparity.media import align_to_patch, load_image, load_video, sample_frame_indices

MEDIA_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "media"


def next_multiple(size: int, patch: int) -> int:
    return math.ceil(size / patch) * patch


def pillow_reference(path: Path, patch: int) -> np.ndarray:
    """The image opened with Pillow, converted to RGB and upsampled with its bicubic filter."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    return np.asarray(image.resize((next_multiple(width, patch), next_multiple(height, patch)), Image.BICUBIC))


def opencv_reference(path: Path, num_frames: int, patch: int) -> np.ndarray:
    """The video read frame by frame with OpenCV, the linspace-sampled frames converted to RGB and each upsampled
    with INTER_AREA."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    height, width = frames[0].shape[:2]
    size = (next_multiple(width, patch), next_multiple(height, patch))
    return np.stack([
        cv2.resize(cv2.cvtColor(frames[index], cv2.COLOR_BGR2RGB), size, interpolation=cv2.INTER_AREA)
        for index in sample_frame_indices(len(frames), num_frames)
    ])


@pytest.mark.parametrize(("name", "patch"), [("chelsea_cat.png", 14), ("chelsea_cat.png", 16), ("coffee_small.jpg", 14)])
def test_resized_image_is_the_pillow_bicubic_reference(name: str, patch: int) -> None:
    path = MEDIA_DIR / name
    reference = pillow_reference(path, patch)
    loaded = load_image(path, patch_size=patch, align="resize")
    assert loaded.frames.shape == reference.shape and loaded.frames.shape[0] % patch == 0
    np.testing.assert_array_equal(loaded.frames, reference)
    # The reference tells the kernels apart: OpenCV's bicubic gives other pixels.
    native = np.asarray(Image.open(path).convert("RGB"))
    cubic = cv2.resize(native, reference.shape[1::-1], interpolation=cv2.INTER_CUBIC)
    assert not np.array_equal(cubic, reference)


def test_resized_video_frames_are_the_opencv_area_reference() -> None:
    path = MEDIA_DIR / "chelsea_pan.mp4"  # 250 x 170
    reference = opencv_reference(path, 4, 14)
    loaded = load_video(path, num_frames=4, patch_size=14, align="resize")
    assert loaded.frames.shape == reference.shape == (4, 182, 252, 3)
    np.testing.assert_array_equal(loaded.frames, reference)
    cubic = np.stack([cv2.resize(frame, (252, 182), interpolation=cv2.INTER_CUBIC)
                      for frame in load_video(path, num_frames=4, patch_size=1).frames])
    assert not np.array_equal(cubic, reference)


@pytest.mark.parametrize("shape", [(31, 45, 3), (3, 31, 45, 3)], ids=["image", "frames"])
def test_align_resize_on_odd_sized_arrays(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    resized = align_to_patch(pixels, 14, "resize")
    if len(shape) == 3:
        expected = np.asarray(Image.fromarray(pixels).resize((56, 42), Image.BICUBIC))
    else:
        expected = np.stack([cv2.resize(frame, (56, 42), interpolation=cv2.INTER_AREA) for frame in pixels])
    assert resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, expected)
