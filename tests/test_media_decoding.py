"""Decoding as users hold media: every container, frame-exact sampling, colour as ffmpeg converts it, rotation,
broken files refused, and the decoder recorded. The files are in tests/media (made by tests/media/make_media.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from vitparity.media import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    MediaError,
    decoder_record,
    load_image,
    load_media,
    load_video,
    media_kind,
    sample_frame_indices,
)
from vitparity.media_integrity import file_problem, jpeg_problem, png_problem

from conftest import verdicts

HERE = Path(__file__).resolve().parent
TEST_MEDIA = HERE / "media"
BUNDLED = HERE.parent / "fixtures" / "media"
# Luma steps of the grey frames (tests/media/make_media.py), as 8-bit RGB levels after limited-range expansion.
CLIP_STEP = 20 * 255 / 219
LONG_STEP = 2 * 255 / 219


def every_frame(path: Path) -> np.ndarray:
    """The reference: every frame decoded in order with a plain VideoCapture, as RGB (T, H, W, 3)."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack(frames)


def grey_index(frames: np.ndarray, step: float) -> list[int]:
    """The index each grey frame carries (its mean level over the luma step of make_media.py)."""
    return [round(float(frame.mean()) / step) for frame in frames]


def first_frame_decodes(path: Path) -> bool:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    ok = capture.grab()
    capture.release()
    return ok


def claimed_count(path: Path) -> float:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        return capture.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        capture.release()


# ---------------------------------------------------------------- containers and extensions


def test_every_video_extension_has_a_test_clip() -> None:
    assert {f".{path.name.split('.')[1]}" for path in TEST_MEDIA.glob("clip.*")} == VIDEO_EXTENSIONS
    assert media_kind("anim.gif") == "video"  # an animated GIF is a video: every frame counts


@pytest.mark.parametrize("suffix", sorted(VIDEO_EXTENSIONS))
def test_every_container_decodes_frame_exactly(suffix: str) -> None:
    path = TEST_MEDIA / f"clip{suffix}"
    reference = every_frame(path)
    assert grey_index(reference, CLIP_STEP) == list(range(10))  # the reference itself is every frame, in order
    for num_frames in (3, 10, 16):
        loaded = load_media(path, num_frames=num_frames, patch_size=16)
        indices = sample_frame_indices(10, num_frames)
        assert (loaded.kind, loaded.metadata["total_frames"], loaded.metadata["frame_indices"]) == ("video", 10, indices)
        np.testing.assert_array_equal(loaded.frames, reference[indices])


@pytest.mark.parametrize("suffix", sorted(IMAGE_EXTENSIONS))
def test_every_image_extension_decodes(tmp_path: Path, suffix: str) -> None:
    photo = cv2.imread(str(BUNDLED / "coffee_small.jpg"), cv2.IMREAD_COLOR)
    gray = suffix in (".pbm", ".pgm")
    stored = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY) if gray else photo
    if suffix == ".pbm":
        stored = np.where(stored > 127, 255, 0).astype(np.uint8)
    encoding = {".jpe": ".jpg", ".jfif": ".jpg", ".dib": ".bmp", ".pnm": ".ppm"}.get(suffix, suffix)
    ok, encoded = cv2.imencode(encoding, stored)
    assert ok
    path = tmp_path / f"photo{suffix}"
    path.write_bytes(encoded.tobytes())
    loaded = load_media(path, patch_size=1)
    assert loaded.kind == "image" and loaded.frames.shape == (70, 105, 3)
    expected = cv2.imdecode(encoded, cv2.IMREAD_COLOR)  # the decoder's own pixels for this file, as RGB
    np.testing.assert_array_equal(loaded.frames, cv2.cvtColor(expected, cv2.COLOR_BGR2RGB))
    if suffix in (".png", ".bmp", ".dib", ".tif", ".tiff", ".ppm", ".pnm", ".pgm", ".pbm"):  # lossless
        exact = cv2.cvtColor(stored, cv2.COLOR_GRAY2RGB) if gray else cv2.cvtColor(stored, cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(loaded.frames, exact)


# ---------------------------------------------------------------- frame-exact sampling


FRAME_EXACT = {
    # file: (frames that decode, what the container claims, what it is)
    "bframes.ts": (60, 60, "H.264 with B-frames in MPEG-TS: seeking by frame number lands elsewhere"),
    "vfr.mp4": (60, 60, "variable frame rate MP4"),
    "short_header.mpg": (74, 69, "MPEG-PS whose header count is 5 short"),
    "vfr_double.mkv": (60, 118, "VFR Matroska claiming about twice its frames"),
    "rotated.mp4": (12, 12, "phone clip with 90 degree rotation side data"),
}


@pytest.mark.parametrize("name", sorted(FRAME_EXACT))
def test_sampling_is_frame_exact(name: str) -> None:
    path = TEST_MEDIA / name
    frames, claimed, _ = FRAME_EXACT[name]
    assert claimed_count(path) == claimed
    reference = every_frame(path)
    assert len(reference) == frames
    if name != "rotated.mp4":  # its frames carry a marker block; their grey levels step by 16
        assert grey_index(reference, LONG_STEP) == list(range(frames))
    for num_frames in (1, 2, 3, 8, 13, 32, 64):
        loaded = load_video(path, num_frames=num_frames, patch_size=16)
        indices = sample_frame_indices(frames, num_frames)
        assert loaded.metadata["total_frames"] == frames and loaded.metadata["frame_indices"] == indices
        np.testing.assert_array_equal(loaded.frames, reference[indices], err_msg=f"{name}, {num_frames} frames")


def test_rotation_side_data_is_applied() -> None:
    loaded = load_video(TEST_MEDIA / "rotated.mp4", num_frames=4, patch_size=16)
    # Stored 64x48 with a bright top-left quarter; shown 90 degrees clockwise: 48x64, bright top-right quarter.
    assert loaded.frames.shape == (4, 64, 48, 3)
    assert (loaded.metadata["width"], loaded.metadata["height"]) == (48, 64)
    assert (loaded.frames[:, :32, 24:] >= 250).all()
    assert (loaded.frames[:, :32, :24] <= 210).all() and (loaded.frames[:, 32:] <= 210).all()  # grey at most 204


def test_exif_orientation_6_is_applied() -> None:
    path = TEST_MEDIA / "exif6.jpg"
    stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # IMREAD_UNCHANGED ignores EXIF: the stored pixels
    assert stored.shape == (48, 64)
    loaded = load_image(path, patch_size=1).frames
    np.testing.assert_array_equal(loaded, np.rot90(cv2.cvtColor(stored, cv2.COLOR_GRAY2RGB), -1))
    assert (loaded[:32, 24:] > 240).all() and (loaded[32:] < 100).all()  # the bright block is now top right


def test_16_bit_png_keeps_its_depth_until_rounded_to_8_bits() -> None:
    ramp = np.linspace(0, 65535, 40 * 30 * 3).round().astype(np.uint16).reshape(30, 40, 3)  # as make_media.py
    loaded = load_image(TEST_MEDIA / "deep16.png", patch_size=1).frames
    expected = ((ramp[..., ::-1].astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(loaded, expected)
    assert len(np.unique(loaded)) == 256  # every 8-bit level: the 16 bits were read, not an 8-bit preview


# ---------------------------------------------------------------- colour


CHARTS = sorted(path.name for path in TEST_MEDIA.glob("chart_*") if path.suffix != ".png")


@pytest.mark.parametrize("name", CHARTS)
def test_video_colour_is_ffmpeg_rgb24_within_3_levels(name: str) -> None:
    reference = cv2.cvtColor(cv2.imread(str(TEST_MEDIA / f"{name}.ffmpeg_rgb24.png")), cv2.COLOR_BGR2RGB)
    loaded = load_video(TEST_MEDIA / name, num_frames=1, patch_size=16).frames[0]
    assert np.abs(loaded.astype(np.int16) - reference).max() <= 3


def test_bt709_limited_red_is_254_as_ffmpeg_decodes_it() -> None:
    loaded = load_video(TEST_MEDIA / "chart_bt709_tv.mp4", num_frames=1, patch_size=16).frames[0]
    assert loaded[16, 16].tolist() == [254, 0, 0]  # the BT.601 matrix gives (232, 0, 1)


def test_colour_check_tells_the_matrices_apart() -> None:
    """The 3-level tolerance fails a decode with the other matrix (what OpenCV 4.10 to 4.12 do)."""
    bt601 = load_video(TEST_MEDIA / "chart_bt601_tv.mp4", num_frames=1, patch_size=16).frames[0]
    bt709 = cv2.cvtColor(cv2.imread(str(TEST_MEDIA / "chart_bt709_tv.mp4.ffmpeg_rgb24.png")), cv2.COLOR_BGR2RGB)
    assert np.abs(bt601.astype(np.int16) - bt709).max() > 3


def test_opencv_below_the_floor_is_refused_for_video(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cv2, "__version__", "4.12.0")
    with pytest.raises(MediaError, match=r"clip\.mp4: OpenCV 4\.12\.0 converts every video with the BT\.601 "
                                         r"matrix.*OpenCV >= 4\.13"):
        load_video(TEST_MEDIA / "clip.mp4")


# ---------------------------------------------------------------- videos that do not decode


def test_video_without_decodable_frames_names_codec_and_container() -> None:
    path = TEST_MEDIA / "av1.webm"
    if first_frame_decodes(path):
        pytest.skip(f"this OpenCV {cv2.__version__} decodes AV1")
    with pytest.raises(MediaError) as raised:
        load_video(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: the video opens but no frame decodes")
    assert "cannot decode its AV01 video in the .webm container" in message
    assert f"OpenCV {cv2.__version__} build (FFmpeg avcodec {decoder_record()['avcodec']})" in message


DAMAGED = {
    # case: (source clip, damage to its bytes, frames the container states, where the message says it stops)
    "matroska_cut_in_half": ("vfr_double.mkv", lambda data: data[: len(data) // 2], 118,
                             r"the last decoded frame starts at \d+\.\d{3} s of the 4\.917 s the container states"),
    "mp4_with_zeroed_bytes": ("vfr.mp4", lambda data: data[: len(data) * 3 // 10] + bytes(200)
                              + data[len(data) * 3 // 10 + 200:], 60,
                              r"the last decoded frame starts at \d+\.\d{3} s of the 3\.292 s the container states"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_video_that_stops_decoding_names_the_frame(tmp_path: Path, case: str) -> None:
    name, damage, stated, where = DAMAGED[case]
    path = tmp_path / name
    path.write_bytes(damage((TEST_MEDIA / name).read_bytes()))
    decodable = len(every_frame(path))
    assert 0 < decodable < 60  # H.264 decoding stops where the file does
    with pytest.raises(MediaError, match=rf"^{re.escape(str(path))}: frame {decodable} does not decode: decoding "
                                         rf"stops after {decodable} of the {stated} frames the container states, "
                                         rf"{where} \(truncated or corrupt file\)$"):
        load_video(path)


# ---------------------------------------------------------------- image integrity


def photo_jpeg(progressive: bool = False) -> bytes:
    """The bundled astronaut photo as a 672x448 quality-90 JPEG (baseline or progressive)."""
    photo = cv2.resize(cv2.imread(str(BUNDLED / "astronaut.jpg")), (672, 448), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    return encoded.tobytes()


def photo_png() -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.imread(str(BUNDLED / "coffee_small.jpg")))
    assert ok
    return encoded.tobytes()


def flipped(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x55]) + data[position + 1:]


def _jpeg_cases() -> dict[str, tuple[bytes, str]]:
    jpeg = photo_jpeg()
    progressive = photo_jpeg(progressive=True)
    middle = len(jpeg) // 2
    return {
        "cut_to_60_percent": (jpeg[: len(jpeg) * 6 // 10], "truncated JPEG"),
        "cut_to_90_percent": (jpeg[: len(jpeg) * 9 // 10], "truncated JPEG"),
        "without_end_marker": (jpeg[:-2], "truncated JPEG"),
        "progressive_cut": (progressive[: len(progressive) * 6 // 10], "truncated JPEG"),
        "bytes_missing_inside": (jpeg[:middle] + jpeg[middle + 300:], "corrupt JPEG: libjpeg-turbo reports "
                                 "'Corrupt JPEG data: premature end of data segment'"),
        "bytes_repeated_inside": (jpeg[:middle] + jpeg[middle - 300:], "corrupt JPEG: libjpeg-turbo reports "
                                  "'Corrupt JPEG data: "),  # then how many extraneous bytes before which marker
        "end_marker_too_early": (jpeg[:middle] + b"\xff\xd9", "corrupt JPEG"),
        "header_length_past_the_end": (jpeg[:4] + b"\xff\xff" + jpeg[6:40], "truncated JPEG"),
    }


JPEG_CASES = sorted(_jpeg_cases())


@pytest.mark.parametrize("case", JPEG_CASES)
@pytest.mark.parametrize("suffix", [".jpg", ".jfif"])
def test_broken_jpeg_is_refused_naming_file_and_cause(tmp_path: Path, case: str, suffix: str) -> None:
    data, cause = _jpeg_cases()[case]
    path = tmp_path / f"photo{suffix}"
    path.write_bytes(data)
    with pytest.raises(MediaError) as raised:
        load_image(path)
    assert str(raised.value).startswith(f"{path}: {cause}")


def test_corrupt_jpeg_that_opencv_decodes_is_still_refused() -> None:
    """Corrupt scan data behind a sound end marker: OpenCV decodes it on every version, libjpeg-turbo warns."""
    for case in ("bytes_missing_inside", "bytes_repeated_inside"):
        data = _jpeg_cases()[case][0]
        assert data.endswith(b"\xff\xd9")
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
        assert jpeg_problem(data).startswith("corrupt JPEG: libjpeg-turbo reports")


def test_sound_jpegs_pass_the_integrity_check() -> None:
    jpeg = photo_jpeg()
    assert jpeg_problem(jpeg) is None
    assert jpeg_problem(photo_jpeg(progressive=True)) is None
    assert jpeg_problem(jpeg + b"trailing bytes after the end marker") is None
    assert jpeg_problem((TEST_MEDIA / "exif6.jpg").read_bytes()) is None
    for path in BUNDLED.glob("*.jpg"):
        assert jpeg_problem(path.read_bytes()) is None, path


def test_end_marker_of_an_embedded_thumbnail_does_not_end_the_file() -> None:
    """An EXIF thumbnail inside APP1 holds its own FF D9: the walk skips the segment by its length."""
    thumbnail = photo_jpeg()[:2000]  # a JPEG-looking blob with a marker run, ending in an end marker
    payload = b"Exif\x00\x00" + thumbnail + b"\xff\xd9"
    jpeg = photo_jpeg()
    with_thumbnail = jpeg[:2] + b"\xff\xe1" + len(payload + b"..").to_bytes(2, "big") + payload + jpeg[2:]
    assert jpeg_problem(with_thumbnail) is None
    assert jpeg_problem(with_thumbnail[: len(with_thumbnail) * 7 // 10]).startswith("truncated JPEG")


def _png_cases() -> dict[str, tuple[bytes, str]]:
    png = photo_png()
    iend = png.rindex(b"IEND") - 4
    idat = png.index(b"IDAT")
    return {
        "bad_crc": (flipped(png, idat + 100), "corrupt PNG: CRC mismatch in chunk IDAT"),
        "without_iend": (png[:iend], "truncated PNG: the file ends after"),
        "cut_to_60_percent": (png[: len(png) * 6 // 10], "truncated PNG: the file ends inside chunk IDAT"),
    }


@pytest.mark.parametrize("case", sorted(_png_cases()))
def test_broken_png_is_refused_naming_file_and_cause(tmp_path: Path, case: str) -> None:
    data, cause = _png_cases()[case]
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    with pytest.raises(MediaError) as raised:
        load_image(path)
    assert str(raised.value).startswith(f"{path}: {cause}")


def test_sound_pngs_pass_the_integrity_check() -> None:
    assert png_problem(photo_png()) is None
    assert png_problem((TEST_MEDIA / "deep16.png").read_bytes()) is None
    assert file_problem(b"BM not checked here") is None


def test_other_truncated_images_are_refused(tmp_path: Path) -> None:
    ok, encoded = cv2.imencode(".webp", cv2.imread(str(BUNDLED / "coffee_small.jpg")))
    path = tmp_path / "photo.webp"
    path.write_bytes(encoded.tobytes()[: encoded.size * 6 // 10])
    with pytest.raises(MediaError, match=rf"^{re.escape(str(path))}: not a decodable image: corrupt, truncated"):
        load_image(path)


# ---------------------------------------------------------------- decoder record


def test_decoder_record_names_opencv_ffmpeg_and_backend() -> None:
    record = decoder_record()
    assert set(record) == {"opencv", "video_backend", "avcodec", "avformat", "avutil", "swscale"}
    assert record["opencv"] == cv2.__version__ and record["video_backend"] == "FFMPEG"
    build = cv2.getBuildInformation()
    for library in ("avcodec", "avformat", "avutil", "swscale"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", record[library]) and f"({record[library]})" in build


def test_decoder_record_without_ffmpeg_says_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "Video I/O:\n    FFMPEG:   NO\n")
    assert decoder_record()["avcodec"] == "none"


def test_video_metadata_names_the_codec() -> None:
    assert load_video(TEST_MEDIA / "bframes.ts", num_frames=2, patch_size=16).metadata["codec"] == "h264"


# ---------------------------------------------------------------- the suite


def test_mpeg_ts_case_runs_in_the_suite(suite, tmp_path: Path) -> None:
    folder = tmp_path / "phone"
    folder.mkdir()
    shutil.copy(TEST_MEDIA / "bframes.ts", folder / "bframes.ts")
    shutil.copy(TEST_MEDIA / "clip.mpg", folder / "clip.mpg")
    result = suite.run(f"--media={folder}", "-m", "not golden", "-k", "bframes or clip")
    out = result.stdout.str()
    assert result.ret == 0, out
    found = verdicts(out)
    assert found["video-bframes.ts"] == "PASS" and found["video-clip.mpg"] == "PASS"


def test_pytest_entry_point_imports_no_numpy_opencv_or_torch() -> None:
    code = "import sys, vitparity.suite.rootdir_check; print(sorted({'numpy', 'cv2', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
