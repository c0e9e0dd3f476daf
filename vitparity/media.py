"""Load images and videos as patch-aligned uint8 RGB arrays for feature extraction.

Images are decoded at native resolution (or a given fraction of it) with EXIF orientation applied; any
colour layout (grayscale, alpha, palette) and 16-bit depth becomes 8-bit RGB. JPEG and PNG files are checked
whole first (vitparity.media_integrity): a truncated or corrupt one is an error on every OpenCV version.

Videos are decoded by OpenCV's FFmpeg backend, which applies the stream's colour matrix and range and its
rotation side data (OpenCV 4.13 and later; older versions are refused, see MIN_OPENCV). They are sampled
uniformly with the release's frame-index formula, reaching the sampled frames by seeking (or decoding through
short gaps) when the container's frame count checks out, and decoding sequentially otherwise. A video that
stops decoding before its end is an error naming the frame. An animated GIF is a video: every frame counts.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from PIL import Image

from .choices import ALIGN_POLICIES
from .media_integrity import file_problem

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".pbm", ".pgm", ".ppm",
    ".pnm", ".jp2", ".avif",
})
# Containers that OpenCV's FFmpeg backend reads (each one has a test clip in tests/media).
VIDEO_EXTENSIONS: frozenset[str] = frozenset({
    ".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".avi", ".mkv", ".webm", ".ts", ".m2ts", ".mts", ".mpg", ".mpeg",
    ".vob", ".ogv", ".flv", ".wmv", ".asf", ".mxf", ".gif",
})

StrPath = str | os.PathLike[str]

# Always three channels, keep 16-bit depth, and (unlike IMREAD_UNCHANGED) apply EXIF orientation.
_IMAGE_READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH

# Sampled frames at most this far ahead are reached by decoding through the gap instead of seeking
# (8 frames of a 48-frame 1080p mp4v clip: 0.90 s by seeking, 0.38 s this way on 2 CPU cores; docs/benchmarks.md).
FORWARD_DECODE_LIMIT = 16

# The first OpenCV whose FFmpeg backend converts video with the stream's colour matrix and range: 4.10 to 4.12
# apply BT.601 limited range to every stream (BT.709 red decodes to 232 instead of ffmpeg's 254; measured with
# tests/media/measure_decoders.py, see pyproject.toml).
MIN_OPENCV = (4, 13)
VIDEO_BACKEND = "FFMPEG"
# A decoded video's last frame may start this many frame intervals before the container's stated end.
END_TOLERANCE_FRAMES = 2


class MediaError(ValueError):
    """Bad media input; str() always names the file path and the reason."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[MediaError], tuple[str, str]]:
        """Pickle with both constructor arguments (worker processes re-raise it)."""
        return (type(self), (self.path, self.reason))


@dataclass
class Media:
    """A decoded, patch-aligned image or video."""

    path: str
    kind: str
    frames: np.ndarray
    metadata: dict[str, Any]


def media_kind(path: StrPath) -> str:
    """Return "image" or "video" from the file extension; raise MediaError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    known = ", ".join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
    raise MediaError(path, f"unknown media extension {suffix or '(none)'!r}; expected one of {known}")


def discover_media(directory: StrPath, *, accept_folder: Callable[[Path], bool] | None = None) -> list[Path]:
    """The image and video files directly inside ``directory``, and the subfolders `accept_folder` accepts (codec
    asset folders), sorted by name.

    Nothing is skipped silently: a folder that holds anything else (another subfolder, a file of another type) or no
    media at all is an error naming those entries. Hidden entries (names starting with ".") are ignored.
    """
    folder = Path(directory)
    if not folder.exists():
        raise MediaError(directory, "media folder not found")
    if not folder.is_dir():
        raise MediaError(directory, "not a folder")
    known = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    files = [entry for entry in entries if (entry.is_file() and entry.suffix.lower() in known)
             or (accept_folder is not None and entry.is_dir() and accept_folder(entry))]
    others = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in entries if entry not in files)
    if others:
        raise MediaError(
            directory,
            f"{len(others)} entries are not image or video files: {', '.join(others)} "
            f"(readable: {', '.join(sorted(known))}; subfolders are not searched)",
        )
    if not files:
        raise MediaError(directory, "no image or video files in the folder")
    return sorted(files, key=lambda entry: entry.name)


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Uniformly sample ``num_frames`` indices from ``total_frames`` frames (release formula).

    ``np.linspace(0, total_frames - 1, num_frames)`` truncated to int, so short
    videos repeat frames and a single-frame video gives all zeros.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [int(index) for index in np.linspace(0, total_frames - 1, num_frames).astype(int)]


def align_to_patch(frames: np.ndarray, patch_size: int, policy: str = "crop") -> np.ndarray:
    """Make height and width of (H, W, 3) or (T, H, W, 3) uint8 frames multiples of ``patch_size``.

    'crop' keeps the top-left native pixels (dropping up to patch_size - 1 rows and columns); 'resize' scales
    up to the next multiple as the release's own extraction tool does: an image (H, W, 3) with Pillow's bicubic
    filter, video frames (T, H, W, 3) each with OpenCV's INTER_AREA; 'pad' zero-pads bottom and right.
    Already aligned frames are returned unchanged.
    """
    if policy not in ALIGN_POLICIES:
        raise ValueError(f"unknown align policy {policy!r}; expected one of {', '.join(ALIGN_POLICIES)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) or (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[-3], frames.shape[-2]
    if height < 1 or width < 1:
        raise ValueError(f"frames have no pixels: {frames.shape}")
    if height % patch_size == 0 and width % patch_size == 0:
        return frames
    if policy == "crop":
        new_height, new_width = height - height % patch_size, width - width % patch_size
        if new_height == 0 or new_width == 0:
            raise ValueError(f"{width}x{height} image is smaller than one {patch_size}x{patch_size} patch")
        return np.ascontiguousarray(frames[..., :new_height, :new_width, :])
    new_height = math.ceil(height / patch_size) * patch_size
    new_width = math.ceil(width / patch_size) * patch_size
    if policy == "pad":
        padding = [(0, 0)] * (frames.ndim - 3) + [(0, new_height - height), (0, new_width - width), (0, 0)]
        return np.pad(frames, padding)
    if frames.ndim == 3:
        return np.array(Image.fromarray(frames).resize((new_width, new_height), Image.Resampling.BICUBIC))
    return np.stack([cv2.resize(frame, (new_width, new_height), interpolation=cv2.INTER_AREA) for frame in frames])


def load_image(path: StrPath, *, patch_size: int = 14, align: str = "crop", scale: float = 1.0) -> Media:
    """Decode an image file to patch-aligned uint8 RGB (H, W, 3) at native resolution times ``scale``."""
    _check_options(path, patch_size, align, scale)
    data = _existing_file(path).read_bytes()
    if not data:
        raise MediaError(path, "file is empty")
    problem = file_problem(data)
    if problem is not None:
        raise MediaError(path, problem)
    try:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), _IMAGE_READ_FLAGS)
    except cv2.error as error:
        raise MediaError(path, f"not a decodable image ({error})") from error
    if decoded is None:
        raise MediaError(
            path, f"not a decodable image: corrupt, truncated, or a format that OpenCV {cv2.__version__} does not read"
        )
    native = cv2.cvtColor(_to_uint8(path, decoded), cv2.COLOR_BGR2RGB)
    scaled = _scale(path, native, scale, patch_size)
    frames = _align(path, scaled, patch_size, align)
    return Media(
        os.fspath(path), "image", frames, _metadata(path, "image", native, scaled, frames, patch_size, align, scale)
    )


def load_video(
    path: StrPath, *, num_frames: int = 8, patch_size: int = 14, align: str = "crop", scale: float = 1.0
) -> Media:
    """Decode ``num_frames`` uniformly sampled frames to patch-aligned uint8 RGB (T, H, W, 3), at ``scale``.

    Seeks to the sampled frames when the container's frame count checks out
    (every sampled frame decodes and nothing follows the last one); otherwise
    decodes the whole file sequentially, counts the real frames and samples
    from that count. MediaError when the file cannot be opened, no frame decodes (the message names the codec
    and container), or decoding stops before the container's end (it names the frame).
    """
    _check_options(path, patch_size, align, scale)
    if num_frames < 1:
        raise MediaError(path, f"num_frames must be >= 1, got {num_frames}")
    if _existing_file(path).stat().st_size == 0:
        raise MediaError(path, "file is empty")
    capture = _open_capture(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        codec = _codec(capture)
        sampled = _sample_by_seeking(path, capture, num_frames)
    finally:
        capture.release()
    decode = "seek"
    if sampled is None:
        sampled = _sample_sequentially(path, num_frames)
        decode = "sequential"
    total_frames, indices, native = sampled
    scaled = _scale(path, native, scale, patch_size)
    frames = _align(path, scaled, patch_size, align)
    metadata = _metadata(path, "video", native, scaled, frames, patch_size, align, scale)
    metadata.update(
        fps=float(fps) if math.isfinite(fps) and fps > 0 else 0.0,
        total_frames=total_frames,
        sampled_frames=num_frames,
        frame_indices=indices,
        decode=decode,
        codec=codec,
    )
    return Media(os.fspath(path), "video", frames, metadata)


def decoder_record() -> dict[str, str]:
    """What decodes the media, recorded with every features folder and golden: the OpenCV version, the video
    backend, and the FFmpeg library versions that OpenCV's build information lists (absent: "none")."""
    record = {"opencv": cv2.__version__, "video_backend": VIDEO_BACKEND}
    build = cv2.getBuildInformation()
    for library in ("avcodec", "avformat", "avutil", "swscale"):
        found = re.search(rf"^\s*{library}:\s*YES \(([^)]*)\)", build, re.MULTILINE)
        record[library] = found.group(1) if found else "none"
    return record


def load_media(
    path: StrPath, *, num_frames: int = 8, patch_size: int = 14, align: str = "crop", scale: float = 1.0
) -> Media:
    """Load an image or a video, chosen by file extension, at ``scale`` times its native size (see scaled_size)."""
    if media_kind(path) == "image":
        return load_image(path, patch_size=patch_size, align=align, scale=scale)
    return load_video(path, num_frames=num_frames, patch_size=patch_size, align=align, scale=scale)


def check_scale(scale: float) -> float:
    """A resolution scale as a float in (0, 1]; ValueError otherwise (NaN, zero, negative, above 1).

    Only fractions of the native size: upscaling adds no information and would test the interpolation.
    """
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number in (0, 1], got {scale!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(f"scale must be in (0, 1] (a fraction of the native size), got {scale!r}")
    return value


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) times ``scale``, each rounded to the nearest pixel, halves up (the size before alignment)."""
    return math.floor(width * scale + 0.5), math.floor(height * scale + 0.5)


def scale_suffix(scale: float) -> str:
    """A case-id suffix for a scale: "" for native size, "@0.5" otherwise (file-name safe: digits, '.', '@')."""
    value = check_scale(scale)
    if value == 1.0:
        return ""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if float(text) != value:
        raise ValueError(f"scale {scale!r} needs more than 6 decimals to be named; use a shorter fraction")
    return "@" + text


def _check_options(path: StrPath, patch_size: int, align: str, scale: float = 1.0) -> None:
    """Reject an unknown align policy, a non-positive patch size or a scale outside (0, 1]."""
    if align not in ALIGN_POLICIES:
        raise MediaError(path, f"unknown align policy {align!r}; expected one of {', '.join(ALIGN_POLICIES)}")
    if patch_size < 1:
        raise MediaError(path, f"patch_size must be >= 1, got {patch_size}")
    try:
        check_scale(scale)
    except ValueError as error:
        raise MediaError(path, str(error)) from None


def _scale(path: StrPath, frames: np.ndarray, scale: float, patch_size: int) -> np.ndarray:
    """Resize (H, W, 3) or (T, H, W, 3) frames to ``scale`` times their size with INTER_AREA (1.0: unchanged).

    A result smaller than one patch in either direction is an error naming the file, whatever the align policy.
    """
    if scale == 1.0:
        return frames
    height, width = frames.shape[-3], frames.shape[-2]
    new_width, new_height = scaled_size(width, height, scale)
    if new_width < patch_size or new_height < patch_size:
        raise MediaError(
            path,
            f"scale {scale} turns {width}x{height} into {new_width}x{new_height} pixels, "
            f"less than one {patch_size}x{patch_size} patch",
        )
    if frames.ndim == 3:
        return cv2.resize(frames, (new_width, new_height), interpolation=cv2.INTER_AREA)
    return np.stack([cv2.resize(frame, (new_width, new_height), interpolation=cv2.INTER_AREA) for frame in frames])


def _existing_file(path: StrPath) -> Path:
    """Return ``path`` as a Path, raising MediaError unless it is an existing regular file."""
    file = Path(path)
    if not file.exists():
        raise MediaError(path, "file not found")
    if not file.is_file():
        raise MediaError(path, "not a regular file")
    return file


def _to_uint8(path: StrPath, pixels: np.ndarray) -> np.ndarray:
    """Convert decoded 8- or 16-bit pixels to uint8 (16-bit values are scaled by 255/65535, rounded)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise MediaError(path, f"unsupported pixel depth {pixels.dtype}")


def _align(path: StrPath, frames: np.ndarray, patch_size: int, align: str) -> np.ndarray:
    """align_to_patch with failures reported as MediaError naming ``path``."""
    try:
        return align_to_patch(frames, patch_size, align)
    except ValueError as error:
        raise MediaError(path, str(error)) from error


def _metadata(
    path: StrPath,
    kind: str,
    native: np.ndarray,
    scaled: np.ndarray,
    frames: np.ndarray,
    patch_size: int,
    align: str,
    scale: float,
) -> dict[str, Any]:
    """Metadata shared by images and videos (plain JSON-serialisable values)."""
    return {
        "path": os.fspath(path),
        "kind": kind,
        "width": int(native.shape[-2]),
        "height": int(native.shape[-3]),
        "scale": float(scale),
        "scaled_width": int(scaled.shape[-2]),
        "scaled_height": int(scaled.shape[-3]),
        "aligned_width": int(frames.shape[-2]),
        "aligned_height": int(frames.shape[-3]),
        "align": align,
        "patch_size": int(patch_size),
    }


def _check_decoder(path: StrPath) -> None:
    """MediaError unless this OpenCV decodes video the same way as every version the project allows."""
    version = tuple(int(part) for part in re.findall(r"\d+", cv2.__version__)[:2])
    if version < MIN_OPENCV:
        raise MediaError(
            path,
            f"OpenCV {cv2.__version__} converts every video with the BT.601 matrix, whatever the stream states; "
            f"videos need OpenCV >= {'.'.join(map(str, MIN_OPENCV))} (pip install 'opencv-python-headless>=4.13')",
        )
    if not cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
        raise MediaError(path, f"this OpenCV {cv2.__version__} build has no FFmpeg backend to decode video")


def _open_capture(path: StrPath) -> cv2.VideoCapture:
    """Open a video with OpenCV's FFmpeg backend, raising MediaError when it cannot read the file."""
    _check_decoder(path)
    capture = cv2.VideoCapture(os.fspath(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise MediaError(path, "not a readable video: FFmpeg cannot open it (corrupt file or unsupported container)")
    return capture


def _codec(capture: cv2.VideoCapture) -> str:
    """The video stream's codec as its FOURCC ("h264", "AV01"), or its number in hex when not printable."""
    value = int(capture.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    text = value.to_bytes(4, "little").decode("latin-1")
    return text.strip() if text.isprintable() and text.strip() else f"0x{value:08x}"


def _no_frame_error(path: StrPath, codec: str) -> MediaError:
    """A video that opens but yields no frame: name its codec and container, and what cannot decode them."""
    container = Path(path).suffix.lower() or "(no extension)"
    decoder = decoder_record()
    return MediaError(
        path,
        f"the video opens but no frame decodes: this OpenCV {decoder['opencv']} build (FFmpeg avcodec "
        f"{decoder['avcodec']}) cannot decode its {codec} video in the {container} container (or the stream is "
        f"corrupt); convert it to a codec this build decodes, e.g. H.264",
    )


def _check_complete(path: StrPath, decoded: int, claimed: float, fps: float, last_time: float) -> None:
    """MediaError when sequential decoding stopped before the container's end.

    Fewer frames than the container states is normal for a variable frame rate, where FFmpeg estimates the count
    from the duration and the fastest rate; then the last frame still starts within END_TOLERANCE_FRAMES frame
    intervals of the stated end (count / fps). A last frame earlier than that, or no frame times to tell, means
    the frames stop decoding before the end.
    """
    if not math.isfinite(claimed) or decoded >= claimed:
        return
    if math.isfinite(fps) and fps > 0 and (decoded == 1 or last_time > 0):
        end = claimed / fps
        if last_time >= end - END_TOLERANCE_FRAMES / fps:
            return
        where = f"the last decoded frame starts at {last_time:.3f} s of the {end:.3f} s the container states"
    else:
        where = "and the container gives no frame times to tell a variable frame rate from missing frames"
    raise MediaError(
        path,
        f"frame {decoded} does not decode: decoding stops after {decoded} of the {int(claimed)} frames the container "
        f"states, {where} (truncated or corrupt file)",
    )


def _grab_at(capture: cv2.VideoCapture, index: int) -> bool:
    """Position ``capture`` on frame ``index`` and grab it.

    A short gap ahead (up to FORWARD_DECODE_LIMIT frames) is decoded through, which is exact and cheaper
    than a seek (a seek decodes from a keyframe before the target); a longer gap or a step back seeks.
    """
    position = int(capture.get(cv2.CAP_PROP_POS_FRAMES))
    if position <= index <= position + FORWARD_DECODE_LIMIT:
        for _ in range(index - position):
            if not capture.grab():
                return False
    elif not capture.set(cv2.CAP_PROP_POS_FRAMES, index) or int(capture.get(cv2.CAP_PROP_POS_FRAMES)) != index:
        return False
    return capture.grab()


def _sample_by_seeking(
    path: StrPath, capture: cv2.VideoCapture, num_frames: int
) -> tuple[int, list[int], np.ndarray] | None:
    """Sample frames by seeking, trusting the container count only if it verifies; None if not.

    The count verifies when its last frame decodes (grabbed even when not sampled) and no frame follows it.
    """
    claimed = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    if not math.isfinite(claimed) or claimed < 1:
        return None
    total_frames = int(claimed)
    indices = sample_frame_indices(total_frames, num_frames)
    decoded: dict[int, np.ndarray] = {}
    for index in sorted({*indices, total_frames - 1}):
        if not _grab_at(capture, index):
            return None
        if index not in indices:
            continue
        ok, frame = capture.retrieve()
        if not ok or frame is None:
            return None
        decoded[index] = frame
    if _grab_at(capture, total_frames):
        return None  # the container undercounts: a frame exists past its claimed end
    return total_frames, indices, _stack_rgb(path, [decoded[index] for index in indices])


def _sample_sequentially(path: StrPath, num_frames: int) -> tuple[int, list[int], np.ndarray]:
    """Count the decodable frames in one pass, then decode only the sampled ones in a second pass."""
    capture = _open_capture(path)
    try:
        claimed, fps, codec = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS), _codec(capture)
        total_frames, last_time = 0, 0.0
        while capture.grab():
            total_frames += 1
            last_time = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
    finally:
        capture.release()
    if total_frames == 0:
        raise _no_frame_error(path, codec)
    _check_complete(path, total_frames, claimed, fps, last_time)
    indices = sample_frame_indices(total_frames, num_frames)
    wanted = set(indices)
    decoded: dict[int, np.ndarray] = {}
    capture = _open_capture(path)
    try:
        for index in range(indices[-1] + 1):
            if not capture.grab():
                break
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok and frame is not None:
                    decoded[index] = frame
    finally:
        capture.release()
    missing = sorted(wanted - decoded.keys())
    if missing:
        raise MediaError(path, f"frames {missing} of {total_frames} could not be decoded")
    return total_frames, indices, _stack_rgb(path, [decoded[index] for index in indices])


def _stack_rgb(path: StrPath, frames: list[np.ndarray]) -> np.ndarray:
    """Stack decoded BGR frames into one (T, H, W, 3) RGB array."""
    if len({frame.shape for frame in frames}) != 1:
        raise MediaError(path, "frame size changes within the video")
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in frames])
