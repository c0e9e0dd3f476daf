"""Tests for vitparity.media: frame sampling, patch alignment, image / video decoding and bad inputs."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from vitparity import media
from vitparity.media import (
    ALIGN_POLICIES,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Media,
    MediaError,
    align_to_patch,
    discover_media,
    load_image,
    load_media,
    load_video,
    media_kind,
    check_scale,
    sample_frame_indices,
    scale_suffix,
    scaled_size,
)

MEDIA_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "media"
BUNDLED = discover_media(MEDIA_DIR)
BUNDLED_VIDEO_FRAMES = {"astronaut_pan.mp4": 48, "chelsea_pan.mp4": 16, "coffee_zoom.mp4": 5, "rocket_tilt.mp4": 240}
IMAGE_KEYS = {
    "path", "kind", "width", "height", "scale", "scaled_width", "scaled_height", "aligned_width", "aligned_height",
    "align", "patch_size",
}
VIDEO_KEYS = IMAGE_KEYS | {"fps", "total_frames", "sampled_frames", "frame_indices", "decode", "codec"}


# ---------------------------------------------------------------- helpers


def real_photo() -> np.ndarray:
    """The bundled 105x70 coffee photograph, BGR as OpenCV reads it."""
    return cv2.imread(str(MEDIA_DIR / "coffee_small.jpg"), cv2.IMREAD_COLOR)


def write_mjpg_avi(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> None:
    """Write BGR frames as an MJPG AVI (OpenCV's built-in writer, available everywhere)."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def panning_frames(count: int) -> list[np.ndarray]:
    """Distinct frames of real content: the coffee photo shifted a little more each frame."""
    photo = real_photo()[:, :98]
    return [np.roll(photo, 3 * index, axis=1) for index in range(count)]


def patch_avi_frame_count(data: bytes, claimed: int) -> bytes:
    """Rewrite the frame count in an AVI's main (avih) and stream (strh) headers."""
    patched = bytearray(data)
    avih, strh = patched.find(b"avih"), patched.find(b"strh")
    patched[avih + 8 + 16 : avih + 8 + 20] = struct.pack("<I", claimed)  # dwTotalFrames
    patched[strh + 8 + 32 : strh + 8 + 36] = struct.pack("<I", claimed)  # dwLength
    return bytes(patched)


def container_frame_count(path: Path) -> float:
    """What the container claims, as OpenCV reports it."""
    capture = cv2.VideoCapture(str(path))
    try:
        return capture.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        capture.release()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    """Write an 8-bit palette (colour type 3) PNG; OpenCV cannot write these itself."""
    height, width = indices.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    scanlines = b"".join(b"\x00" + row.tobytes() for row in indices.astype(np.uint8))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        + png_chunk(b"IDAT", zlib.compress(scanlines))
        + png_chunk(b"IEND", b"")
    )


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an EXIF APP1 segment holding only the Orientation tag right after the JPEG SOI marker."""
    ifd_entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, SHORT, count 1, value
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + ifd_entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


# How a viewer displays stored pixels for each EXIF orientation value.
EXIF_DISPLAY: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda pixels: pixels,
    2: np.fliplr,
    3: lambda pixels: np.rot90(pixels, 2),
    4: np.flipud,
    5: lambda pixels: pixels.transpose(1, 0, 2),
    6: lambda pixels: np.rot90(pixels, -1),
    7: lambda pixels: np.rot90(pixels, 2).transpose(1, 0, 2),
    8: lambda pixels: np.rot90(pixels, 1),
}


# ---------------------------------------------------------------- frame sampling


@pytest.mark.parametrize("num_frames", [1, 8])
@pytest.mark.parametrize("total", [1, 5, 8, 240, 241])
def test_sample_frame_indices_is_release_formula(total: int, num_frames: int) -> None:
    expected = np.linspace(0, total - 1, num_frames).astype(int).tolist()
    indices = sample_frame_indices(total, num_frames)
    assert indices == expected
    assert all(type(index) is int for index in indices)


def test_sample_frame_indices_repeats_short_videos() -> None:
    assert sample_frame_indices(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert sample_frame_indices(1, 8) == [0] * 8
    assert sample_frame_indices(241, 8) == [0, 34, 68, 102, 137, 171, 205, 240]


@pytest.mark.parametrize(("total", "num_frames"), [(0, 8), (-3, 8), (5, 0), (5, -1)])
def test_sample_frame_indices_rejects_non_positive(total: int, num_frames: int) -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(total, num_frames)


# ---------------------------------------------------------------- patch alignment


@pytest.mark.parametrize(
    ("policy", "expected_hw"), [("crop", (98, 70)), ("resize", (112, 84)), ("pad", (112, 84))]
)
@pytest.mark.parametrize("leading", [(), (3,)], ids=["single", "frames"])
def test_align_sizes(policy: str, expected_hw: tuple[int, int], leading: tuple[int, ...]) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (*leading, 100, 71, 3), dtype=np.uint8)
    aligned = align_to_patch(frames, 14, policy)
    assert aligned.shape == (*leading, *expected_hw, 3)
    assert aligned.dtype == np.uint8


def test_align_crop_keeps_native_top_left_pixels() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (2, 45, 31, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align_to_patch(frames, 14, "crop"), frames[:, :42, :28])


def test_align_pad_adds_zeros_bottom_right() -> None:
    image = np.full((15, 20, 3), 200, dtype=np.uint8)
    padded = align_to_patch(image, 14, "pad")
    assert padded.shape == (28, 28, 3)
    np.testing.assert_array_equal(padded[:15, :20], image)
    assert not padded[15:].any() and not padded[:, 20:].any()


@pytest.mark.parametrize("policy", ALIGN_POLICIES)
def test_align_leaves_aligned_frames_untouched(policy: str) -> None:
    frames = np.zeros((4, 28, 42, 3), dtype=np.uint8)
    assert align_to_patch(frames, 14, policy) is frames


def test_align_small_image() -> None:
    tiny = np.ones((10, 30, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        align_to_patch(tiny, 14, "crop")
    assert align_to_patch(tiny, 14, "pad").shape == (14, 42, 3)
    assert align_to_patch(tiny, 14, "resize").shape == (14, 42, 3)


def test_align_rejects_unknown_policy_and_bad_arrays() -> None:
    image = np.zeros((28, 28, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="unknown align policy"):
        align_to_patch(image, 14, "stretch")
    with pytest.raises(ValueError):
        align_to_patch(image.astype(np.float32), 14, "crop")
    with pytest.raises(ValueError):
        align_to_patch(image[..., 0], 14, "crop")


# ---------------------------------------------------------------- images


def test_grayscale_png_becomes_rgb(tmp_path: Path) -> None:
    gray = cv2.cvtColor(real_photo(), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    frames = load_image(tmp_path / "gray.png", patch_size=1).frames
    assert frames.dtype == np.uint8 and frames.shape == (*gray.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(frames[..., channel], gray)


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    bgr = real_photo()
    alpha = np.linspace(0, 255, bgr.shape[1], dtype=np.uint8)[None, :].repeat(bgr.shape[0], 0)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([bgr, alpha]))
    frames = load_image(tmp_path / "rgba.png", patch_size=1).frames
    np.testing.assert_array_equal(frames, bgr[..., ::-1])


@pytest.mark.parametrize("channels", [1, 3, 4], ids=["gray16", "rgb16", "rgba16"])
def test_16_bit_png_becomes_8_bit(tmp_path: Path, channels: int) -> None:
    bgr8 = real_photo()
    bgr16 = bgr8.astype(np.uint16) * 257  # exact 16-bit equivalents of the 8-bit values
    bgr16[0, :4, 0] = [128, 129, 65535, 0]  # rounding: 128/257 -> 0, 129/257 -> 1
    expected_bgr = bgr8.copy()
    expected_bgr[0, :4, 0] = [0, 1, 255, 0]
    layouts = {1: bgr16[..., 0], 3: bgr16, 4: np.dstack([bgr16, np.full(bgr16.shape[:2], 65535, np.uint16)])}
    cv2.imwrite(str(tmp_path / "deep.png"), layouts[channels])
    frames = load_image(tmp_path / "deep.png", patch_size=1).frames
    expected = np.repeat(expected_bgr[..., :1], 3, axis=2) if channels == 1 else expected_bgr[..., ::-1]
    assert frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, expected)


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [128, 64, 32]], dtype=np.uint8)
    indices = (np.arange(28 * 42).reshape(28, 42) // 7) % 4
    write_palette_png(tmp_path / "palette.png", indices, palette)
    frames = load_image(tmp_path / "palette.png").frames
    np.testing.assert_array_equal(frames, palette[indices])


@pytest.mark.parametrize("orientation", sorted(EXIF_DISPLAY))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    ok, encoded = cv2.imencode(".jpg", real_photo(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    (tmp_path / "plain.jpg").write_bytes(encoded.tobytes())
    (tmp_path / "rotated.jpg").write_bytes(with_exif_orientation(encoded.tobytes(), orientation))
    stored = load_image(tmp_path / "plain.jpg", patch_size=1).frames
    shown = load_image(tmp_path / "rotated.jpg", patch_size=1)
    np.testing.assert_array_equal(shown.frames, EXIF_DISPLAY[orientation](stored))
    assert (shown.metadata["width"], shown.metadata["height"]) == (shown.frames.shape[1], shown.frames.shape[0])


def test_exif_orientation_agrees_with_pillow(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    image_ops = pytest.importorskip("PIL.ImageOps")
    ok, encoded = cv2.imencode(".jpg", real_photo())
    assert ok
    path = tmp_path / "rotated.jpg"
    path.write_bytes(with_exif_orientation(encoded.tobytes(), 6))
    with image_module.open(path) as opened:
        reference = np.asarray(image_ops.exif_transpose(opened).convert("RGB"))
    np.testing.assert_array_equal(load_image(path, patch_size=1).frames, reference)


def test_image_alignment_and_metadata() -> None:
    path = MEDIA_DIR / "coffee_small.jpg"  # 105 x 70
    cropped = load_image(path)
    assert cropped.frames.shape == (70, 98, 3)
    assert cropped.metadata == {
        "path": str(path),
        "kind": "image",
        "width": 105,
        "height": 70,
        "scale": 1.0,
        "scaled_width": 105,
        "scaled_height": 70,
        "aligned_width": 98,
        "aligned_height": 70,
        "align": "crop",
        "patch_size": 14,
    }
    native = load_image(path, patch_size=1).frames
    np.testing.assert_array_equal(cropped.frames, native[:, :98])
    assert load_image(path, align="resize").frames.shape == (70, 112, 3)
    padded = load_image(path, align="pad").frames
    assert padded.shape == (70, 112, 3) and not padded[:, 105:].any()


# ---------------------------------------------------------------- bundled media


def test_bundled_media_set() -> None:
    kinds = [media_kind(path) for path in BUNDLED]
    assert kinds.count("image") >= 3 and kinds.count("video") >= 3
    assert sum(path.stat().st_size for path in BUNDLED) < 2_000_000


@pytest.mark.parametrize("path", BUNDLED, ids=[path.name for path in BUNDLED])
def test_bundled_media_loads(path: Path) -> None:
    loaded = load_media(path)
    assert isinstance(loaded, Media)
    assert loaded.kind == media_kind(path) and loaded.path == str(path)
    assert loaded.frames.dtype == np.uint8 and loaded.frames.shape[-1] == 3
    assert loaded.frames.ndim == (3 if loaded.kind == "image" else 4)
    height, width = loaded.frames.shape[-3:-1]
    assert height % 14 == 0 and width % 14 == 0
    meta = loaded.metadata
    assert json.loads(json.dumps(meta)) == meta
    assert (meta["aligned_width"], meta["aligned_height"]) == (width, height)
    assert max(meta["width"], meta["height"]) <= 520
    assert set(meta) == (IMAGE_KEYS if loaded.kind == "image" else VIDEO_KEYS)


@pytest.mark.parametrize("forward_limit", [0, media.FORWARD_DECODE_LIMIT, 10_000], ids=["seek-only", "default", "decode-through"])
@pytest.mark.parametrize("name", sorted(BUNDLED_VIDEO_FRAMES))
def test_bundled_video_seeking_matches_sequential_decode(name: str, forward_limit: int, monkeypatch) -> None:
    """Seeking, decoding through gaps, or the default mix of both: the frames of a sequential decode."""
    monkeypatch.setattr(media, "FORWARD_DECODE_LIMIT", forward_limit)
    path = MEDIA_DIR / name
    loaded = load_video(path, num_frames=8, patch_size=1)
    total = BUNDLED_VIDEO_FRAMES[name]
    assert loaded.metadata["decode"] == "seek"
    assert loaded.metadata["total_frames"] == total
    assert loaded.metadata["frame_indices"] == sample_frame_indices(total, 8)
    assert loaded.metadata["sampled_frames"] == 8 and loaded.frames.shape[0] == 8
    sequential_total, sequential_indices, sequential_frames = media._sample_sequentially(path, 8)
    assert (sequential_total, sequential_indices) == (total, loaded.metadata["frame_indices"])
    np.testing.assert_array_equal(loaded.frames, sequential_frames)


# ---------------------------------------------------------------- videos


def test_video_with_fewer_frames_than_requested_repeats_frames() -> None:
    loaded = load_video(MEDIA_DIR / "coffee_zoom.mp4", num_frames=8)
    assert loaded.metadata["total_frames"] == 5
    assert loaded.metadata["frame_indices"] == [0, 0, 1, 1, 2, 2, 3, 4]
    assert loaded.frames.shape == (8, 112, 168, 3)
    np.testing.assert_array_equal(loaded.frames[0], loaded.frames[1])
    assert not np.array_equal(loaded.frames[1], loaded.frames[2])


def test_video_fps_and_native_size() -> None:
    loaded = load_video(MEDIA_DIR / "chelsea_pan.mp4", num_frames=4)
    meta = loaded.metadata
    assert meta["fps"] == pytest.approx(12.0)
    assert (meta["width"], meta["height"], meta["aligned_width"], meta["aligned_height"]) == (250, 170, 238, 168)
    assert loaded.frames.shape == (4, 168, 238, 3)


@pytest.mark.parametrize(("suffix", "fourcc"), [(".mp4", "mp4v"), (".avi", "MJPG")])
def test_single_frame_video(tmp_path: Path, suffix: str, fourcc: str) -> None:
    path = tmp_path / f"still{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, (98, 70))
    assert writer.isOpened()
    writer.write(real_photo()[:, :98])
    writer.release()
    loaded = load_video(path, num_frames=8)
    assert loaded.metadata["total_frames"] == 1
    assert loaded.metadata["frame_indices"] == [0] * 8
    assert loaded.frames.shape == (8, 70, 98, 3)
    assert all(np.array_equal(frame, loaded.frames[0]) for frame in loaded.frames)


def test_undercounting_container_falls_back_to_sequential(tmp_path: Path) -> None:
    honest_path, lying_path = tmp_path / "honest.avi", tmp_path / "lying.avi"
    write_mjpg_avi(honest_path, panning_frames(30))
    lying_path.write_bytes(patch_avi_frame_count(honest_path.read_bytes(), 20))
    assert container_frame_count(lying_path) == 20
    honest = load_video(honest_path, num_frames=8)
    lying = load_video(lying_path, num_frames=8)
    assert honest.metadata["decode"] == "seek"
    assert lying.metadata["decode"] == "sequential"
    assert lying.metadata["total_frames"] == honest.metadata["total_frames"] == 30
    assert lying.metadata["frame_indices"] == honest.metadata["frame_indices"] == sample_frame_indices(30, 8)
    np.testing.assert_array_equal(lying.frames, honest.frames)


@pytest.mark.parametrize("num_frames", [1, 8])
def test_overcounting_container_is_refused_naming_the_missing_frame(tmp_path: Path, num_frames: int) -> None:
    """A header claiming 45 frames of which 30 exist, at constant frame rate: frames stop before the stated end."""
    honest_path, lying_path = tmp_path / "honest.avi", tmp_path / "lying.avi"
    write_mjpg_avi(honest_path, panning_frames(30))
    lying_path.write_bytes(patch_avi_frame_count(honest_path.read_bytes(), 45))
    assert container_frame_count(lying_path) == 45
    with pytest.raises(MediaError, match=r"lying\.avi: frame 30 does not decode: decoding stops after 30 of the 45 "
                                         r"frames the container states, the last decoded frame starts at 2\.900 s of "
                                         r"the 4\.500 s the container states \(truncated or corrupt file\)"):
        load_video(lying_path, num_frames=num_frames)


def test_truncated_video_is_refused_naming_the_frame(tmp_path: Path) -> None:
    full, cut = tmp_path / "full.avi", tmp_path / "cut.avi"
    write_mjpg_avi(full, panning_frames(30))
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    capture = cv2.VideoCapture(str(cut))
    decodable = 0
    while capture.grab():
        decodable += 1
    capture.release()
    assert 0 < decodable < 30
    with pytest.raises(MediaError, match=rf"cut\.avi: frame {decodable} does not decode"):
        load_video(cut, num_frames=8)


def test_sequential_sampling_directly() -> None:
    total, indices, frames = media._sample_sequentially(MEDIA_DIR / "rocket_tilt.mp4", 3)
    assert (total, indices) == (240, [0, 119, 239])
    assert frames.shape == (3, 112, 112, 3) and frames.dtype == np.uint8


# ---------------------------------------------------------------- bad inputs


def _missing_image(tmp_path: Path) -> Path:
    return tmp_path / "missing.jpg"


def _missing_video(tmp_path: Path) -> Path:
    return tmp_path / "missing.mp4"


def _text_as_jpg(tmp_path: Path) -> Path:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photograph\n")
    return path


def _empty_jpg(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return path


def _empty_mp4(tmp_path: Path) -> Path:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    return path


def _garbage_mp4(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _frameless_avi(tmp_path: Path) -> Path:
    path = tmp_path / "frameless.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (98, 70))
    writer.release()
    return path


def _headers_only_avi(tmp_path: Path) -> Path:
    full, path = tmp_path / "full.avi", tmp_path / "headers_only.avi"
    write_mjpg_avi(full, panning_frames(10))
    data = full.read_bytes()
    path.write_bytes(data[: data.find(b"movi") + 4])  # claims 10 frames, holds none
    return path


def _tiny_png(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.png"
    cv2.imwrite(str(path), real_photo()[:10, :10])
    return path


def _folder_as_jpg(tmp_path: Path) -> Path:
    path = tmp_path / "folder.jpg"
    path.mkdir()
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], dict[str, object], str]] = {
    # case: (make the file, load_media keyword arguments, expected reason fragment)
    "missing_jpg": (_missing_image, {}, "not found"),
    "missing_mp4": (_missing_video, {}, "not found"),
    "folder_named_jpg": (_folder_as_jpg, {}, "not a regular file"),
    "text_named_jpg": (_text_as_jpg, {}, "not a decodable image"),
    "empty_jpg": (_empty_jpg, {}, "empty"),
    "empty_mp4": (_empty_mp4, {}, "empty"),
    "garbage_mp4": (_garbage_mp4, {}, "not a readable video"),
    "frameless_avi": (_frameless_avi, {}, "the video opens but no frame decodes"),
    "headers_only_avi": (_headers_only_avi, {}, "cannot decode its MJPG video in the .avi container"),
    "smaller_than_patch": (_tiny_png, {}, "smaller than one 14x14 patch"),
    "zero_num_frames": (lambda tmp: MEDIA_DIR / "coffee_zoom.mp4", {"num_frames": 0}, "num_frames"),
    "unknown_extension": (lambda tmp: MEDIA_DIR / "README.md", {}, "unknown media extension"),
    "unknown_align": (lambda tmp: MEDIA_DIR / "astronaut.jpg", {"align": "stretch"}, "unknown align policy"),
    "zero_patch_size": (lambda tmp: MEDIA_DIR / "astronaut.jpg", {"patch_size": 0}, "patch_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_media_error_naming_file(tmp_path: Path, case: str) -> None:
    make, kwargs, reason = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(MediaError) as raised:
        load_media(path, **kwargs)
    message = str(raised.value)
    assert str(path) in message and reason in message
    assert raised.value.path == str(path)


def test_media_error_is_value_error_and_pickles() -> None:
    error = MediaError("clip.mp4", "video has no decodable frames")
    assert isinstance(error, ValueError)
    assert str(error) == "clip.mp4: video has no decodable frames"
    restored = pickle.loads(pickle.dumps(error))
    assert (type(restored), str(restored), restored.path, restored.reason) == (
        MediaError,
        str(error),
        error.path,
        error.reason,
    )


# ---------------------------------------------------------------- discovery and dispatch


def test_media_kind() -> None:
    assert {media_kind(f"a{suffix}") for suffix in IMAGE_EXTENSIONS} == {"image"}
    assert {media_kind(f"a{suffix}") for suffix in VIDEO_EXTENSIONS} == {"video"}
    assert media_kind("PHOTO.JPG") == "image" and media_kind("clip.MP4") == "video"
    for name in ("notes.txt", "no_extension"):
        with pytest.raises(MediaError, match=name):
            media_kind(name)


def test_discover_media(tmp_path: Path) -> None:
    for name in ("b.png", "a.mp4", "C.JPG", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    assert [path.name for path in discover_media(tmp_path)] == ["C.JPG", "a.mp4", "b.png"]
    assert discover_media(str(tmp_path)) == discover_media(tmp_path)


def test_discover_media_names_what_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "clip.svg").write_bytes(b"x")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "inner.jpg").write_bytes(b"x")
    with pytest.raises(MediaError, match=r"3 entries are not image or video files: clip.svg, nested/, notes.txt"):
        discover_media(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="no image or video files"):
        discover_media(empty)


def test_discover_media_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MediaError, match="nowhere"):
        discover_media(missing)
    shutil.copy(MEDIA_DIR / "coffee_small.jpg", tmp_path / "file.jpg")
    with pytest.raises(MediaError, match="not a folder"):
        discover_media(tmp_path / "file.jpg")


def test_load_media_dispatches_by_extension(tmp_path: Path) -> None:
    assert load_media(MEDIA_DIR / "rocket_portrait.jpg").kind == "image"
    video = load_media(MEDIA_DIR / "rocket_tilt.mp4", num_frames=3)
    assert video.kind == "video" and video.frames.shape[0] == 3
    shutil.copy(MEDIA_DIR / "coffee_small.jpg", tmp_path / "upper.JPG")
    assert load_media(tmp_path / "upper.JPG").kind == "image"


# ---------------------------------------------------------------- resolution scale


def test_scaled_image_is_area_resized_then_aligned() -> None:
    path = MEDIA_DIR / "chelsea_cat.png"
    native = load_image(path, patch_size=1).frames
    height, width = native.shape[:2]
    half = load_image(path, scale=0.5)
    new_width, new_height = scaled_size(width, height, 0.5)
    expected = cv2.resize(native, (new_width, new_height), interpolation=cv2.INTER_AREA)
    aligned = (new_height - new_height % 14, new_width - new_width % 14)
    np.testing.assert_array_equal(half.frames, expected[: aligned[0], : aligned[1]])
    meta = half.metadata
    assert (meta["scale"], meta["scaled_width"], meta["scaled_height"]) == (0.5, new_width, new_height)
    assert (meta["width"], meta["height"]) == (width, height)
    assert (meta["aligned_height"], meta["aligned_width"]) == aligned
    assert load_image(path, scale=0.5, align="pad").frames.shape[:2] == tuple(-(-n // 14) * 14 for n in (new_height, new_width))


def test_scale_one_is_the_native_case() -> None:
    path = MEDIA_DIR / "coffee_small.jpg"
    np.testing.assert_array_equal(load_image(path, scale=1.0).frames, load_image(path).frames)
    assert load_image(path).metadata["scale"] == 1.0


def test_scaled_video_resizes_every_frame() -> None:
    path = MEDIA_DIR / "coffee_zoom.mp4"  # 168x112
    native = load_video(path, num_frames=2, patch_size=1).frames
    scaled = load_video(path, num_frames=2, scale=0.5)
    expected = np.stack([cv2.resize(frame, (84, 56), interpolation=cv2.INTER_AREA) for frame in native])
    np.testing.assert_array_equal(scaled.frames, expected[:, :56, :84])
    assert scaled.frames.shape == (2, 56, 84, 3) and scaled.metadata["scale"] == 0.5
    assert load_media(path, num_frames=2, scale=0.5).frames.shape == (2, 56, 84, 3)


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5, float("nan"), float("inf"), "half"])
def test_scale_outside_zero_one_is_refused(scale: object) -> None:
    path = MEDIA_DIR / "coffee_small.jpg"
    with pytest.raises(MediaError, match=r"coffee_small\.jpg: scale must be .*\(0, 1\]"):
        load_media(path, scale=scale)
    with pytest.raises(MediaError, match=r"coffee_zoom\.mp4: scale must be"):
        load_video(MEDIA_DIR / "coffee_zoom.mp4", scale=scale)


@pytest.mark.parametrize("align", ALIGN_POLICIES)
def test_scale_below_one_patch_names_the_file(align: str) -> None:
    path = MEDIA_DIR / "coffee_small.jpg"  # 105x70: at 0.1, 11x7 pixels
    with pytest.raises(MediaError, match=r"coffee_small\.jpg: scale 0\.1 turns 105x70 into 11x7 pixels, less than one 14x14 patch"):
        load_image(path, scale=0.1, align=align)
    assert load_image(path, scale=0.2, align=align).frames.shape[0] == 14  # 21x14: still one patch high


def test_scale_suffix() -> None:
    assert (scale_suffix(1.0), scale_suffix(1), scale_suffix(0.5), scale_suffix(0.25)) == ("", "", "@0.5", "@0.25")
    assert scale_suffix(0.333) == "@0.333"
    for bad in (0.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="scale must be"):
            scale_suffix(bad)
    with pytest.raises(ValueError, match="more than 6 decimals"):
        scale_suffix(1 / 3)
    assert check_scale(0.5) == 0.5 and scaled_size(105, 70, 0.5) == (53, 35)
