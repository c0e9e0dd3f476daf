"""Regenerate the small test media in tests/media (needs ffmpeg on the PATH, numpy and opencv-python-headless).

Every video frame is one flat grey level that rises with the frame index (luma 16 + 2 * index, or 16 + 20 * index in
the short container clips), so a decoded frame names its own index: frame-exact decoding is checked by decoding
every frame in order and comparing. The rotated clip and the EXIF JPEG carry a bright top-left block, so the
applied rotation can be read from the pixels.

Usage: python tests/media/make_media.py [--out tests/media]
"""

from __future__ import annotations

import argparse
import struct
import subprocess
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 64, 48

# name: (frames, luma step, frames per second, ffmpeg output arguments)
CONTAINERS: dict[str, tuple[int, int, str, list[str]]] = {
    "clip.ts": (10, 20, "24", ["-c:v", "libx264", "-bf", "2", "-f", "mpegts"]),
    "clip.m2ts": (10, 20, "24", ["-c:v", "libx264", "-bf", "2", "-f", "mpegts", "-mpegts_m2ts_mode", "1"]),
    "clip.mts": (10, 20, "24", ["-c:v", "libx264", "-bf", "2", "-f", "mpegts", "-mpegts_m2ts_mode", "1"]),
    "clip.mpg": (10, 20, "25", ["-c:v", "mpeg2video", "-q:v", "2", "-f", "mpeg"]),
    "clip.mpeg": (10, 20, "25", ["-c:v", "mpeg1video", "-q:v", "2", "-f", "mpeg"]),
    "clip.vob": (10, 20, "25", ["-c:v", "mpeg2video", "-q:v", "2", "-f", "vob"]),
    "clip.m4v": (10, 20, "24", ["-c:v", "libx264", "-f", "mp4"]),
    "clip.mp4": (10, 20, "24", ["-c:v", "libx264"]),
    "clip.mov": (10, 20, "24", ["-c:v", "libx264"]),
    "clip.3gp": (10, 20, "15", ["-c:v", "mpeg4", "-q:v", "2"]),
    "clip.3g2": (10, 20, "15", ["-c:v", "mpeg4", "-q:v", "2"]),
    "clip.mkv": (10, 20, "24", ["-c:v", "libx264"]),
    "clip.webm": (10, 20, "24", ["-c:v", "libvpx-vp9", "-crf", "10", "-b:v", "0"]),
    "clip.ogv": (10, 20, "24", ["-c:v", "libtheora", "-q:v", "9"]),
    "clip.flv": (10, 20, "24", ["-c:v", "flv1", "-q:v", "2"]),
    "clip.wmv": (10, 20, "24", ["-c:v", "wmv2", "-q:v", "2"]),
    "clip.asf": (10, 20, "24", ["-c:v", "wmv2", "-q:v", "2"]),
    "clip.avi": (10, 20, "24", ["-c:v", "mjpeg", "-q:v", "2"]),
    "clip.mxf": (10, 20, "25", ["-c:v", "mpeg2video", "-q:v", "2"]),
    "clip.gif": (10, 20, "10", ["-c:v", "gif"]),
}


# Colour charts: H.264 clips of the same 8 colours under each colour matrix and range, and what ffmpeg decodes them
# to as rgb24 (the reference: its conversion honours the stream's matrix and range).
CHART_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
                 (128, 128, 128), (235, 200, 40))
H264 = ["-c:v", "libx264"]
VP9 = ["-c:v", "libvpx-vp9", "-crf", "10", "-b:v", "0"]
CHARTS = {  # file: (ffmpeg scale matrix, colorspace tag, range, encoder); H.264 full range decodes as yuvj420p,
    # VP9 full range as yuv420p with a range flag
    "chart_bt601_tv.mp4": ("bt601", "smpte170m", "tv", H264),
    "chart_bt601_pc.mp4": ("bt601", "smpte170m", "pc", H264),
    "chart_bt709_tv.mp4": ("bt709", "bt709", "tv", H264),
    "chart_bt709_pc.mp4": ("bt709", "bt709", "pc", H264),
    "chart_bt709_pc.webm": ("bt709", "bt709", "pc", VP9),
}


def chart_rgb() -> np.ndarray:
    """A 128x64 RGB chart: the 8 colours as 32x32 patches, 4 per row."""
    chart = np.zeros((64, 128, 3), np.uint8)
    for index, colour in enumerate(CHART_COLOURS):
        row, column = divmod(index, 4)
        chart[row * 32:(row + 1) * 32, column * 32:(column + 1) * 32] = colour
    return chart


def make_chart(clip: Path, matrix: str, colorspace: str, colour_range: str, encoder: list[str]) -> None:
    """Encode the chart under a colour matrix and range (tagged in the stream); ffmpeg's rgb24 decode of its first
    frame goes beside it as <clip>.ffmpeg_rgb24.png."""
    chart = chart_rgb()
    subprocess.run([
        "ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "128x64", "-r", "24", "-i", "-",
        "-vf", f"scale=out_color_matrix={matrix}:out_range={colour_range},format=yuv420p", *encoder,
        "-colorspace", colorspace, "-color_primaries", colorspace, "-color_trc", colorspace,
        "-color_range", colour_range, str(clip),
    ], input=chart.tobytes() * 2, check=True)
    decoded = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(clip), "-frames:v", "1", "-pix_fmt", "rgb24", "-f", "rawvideo", "-"],
        check=True, capture_output=True,
    ).stdout
    reference = np.frombuffer(decoded, np.uint8).reshape(chart.shape)
    assert cv2.imwrite(str(clip) + ".ffmpeg_rgb24.png", cv2.cvtColor(reference, cv2.COLOR_RGB2BGR))


def grey_frames(count: int, step: int, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """Raw yuv420p frames: frame i has luma 16 + step * i everywhere and neutral chroma."""
    frames = []
    for index in range(count):
        luma = np.full((height, width), 16 + step * index, np.uint8)
        chroma = np.full((height // 2, width // 2), 128, np.uint8)
        frames.append(luma.tobytes() + chroma.tobytes() * 2)
    return b"".join(frames)


def marked_frames(count: int, step: int) -> bytes:
    """Grey frames (see grey_frames) with a bright block over the top-left quarter: rotation shows in the pixels."""
    frames = []
    for index in range(count):
        luma = np.full((HEIGHT, WIDTH), 16 + step * index, np.uint8)
        luma[: HEIGHT // 2, : WIDTH // 2] = 235
        chroma = np.full((HEIGHT // 2, WIDTH // 2), 128, np.uint8)
        frames.append(luma.tobytes() + chroma.tobytes() * 2)
    return b"".join(frames)


def ffmpeg(out: Path, raw: bytes, rate: str, arguments: list[str], *, size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:
    """Encode raw yuv420p frames read from a pipe at `rate` frames per second."""
    command = [
        "ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{size[0]}x{size[1]}",
        "-r", rate, "-i", "-", *arguments, str(out),
    ]
    subprocess.run(command, input=raw, check=True)


def exif_orientation_segment(orientation: int) -> bytes:
    """An APP1 Exif segment holding one IFD0 entry: Orientation (tag 0x0112, SHORT) = `orientation`."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8)  # big-endian TIFF header, IFD0 at offset 8
    tiff += struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def set_mp4_rotation_90(path: Path) -> None:
    """Write a 90 degree clockwise display matrix into the one track header (tkhd) of an MP4, as a phone does."""
    data = bytearray(path.read_bytes())
    box = data.index(b"tkhd")
    version = data[box + 4]
    matrix = box + 4 + (52 if version == 1 else 40)
    height = struct.unpack(">I", data[matrix + 40:matrix + 44])[0] >> 16
    values = (0, 1 << 16, 0, -(1 << 16), 0, 0, height << 16, 0, 1 << 30)
    data[matrix:matrix + 36] = struct.pack(">9i", *values)
    path.write_bytes(bytes(data))


def make(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, (matrix, colorspace, colour_range, encoder) in CHARTS.items():
        make_chart(out / name, matrix, colorspace, colour_range, encoder)
    for name, (count, step, rate, arguments) in CONTAINERS.items():
        ffmpeg(out / name, grey_frames(count, step), rate, arguments)
    # H.264 with B-frames in MPEG-TS: seeking by frame number lands on other frames.
    ffmpeg(out / "bframes.ts", grey_frames(60, 2), "24",
           ["-c:v", "libx264", "-bf", "3", "-g", "12", "-qp", "0", "-f", "mpegts"])
    # Variable frame rate MP4: frame durations 1, 1, 2 ticks of 1/24 s, repeating.
    ffmpeg(out / "vfr.mp4", grey_frames(60, 2), "24",
           ["-vf", "setpts='(N+floor(N/3))/24/TB'", "-fps_mode", "passthrough", "-c:v", "libx264", "-qp", "0"])
    # MPEG-PS whose header frame count (69, from its estimated duration) is 5 short of the 74 frames that decode.
    ffmpeg(out / "short_header.mpg", grey_frames(74, 2), "25", ["-c:v", "mpeg2video", "-q:v", "1", "-f", "mpeg"])
    # VFR Matroska: frames alternate 1 and 3 ticks of 1/24 s, the container's rate is the fastest one.
    ffmpeg(out / "vfr_double.mkv", grey_frames(60, 2), "24",
           ["-vf", "setpts='(2*N-mod(N,2))/24/TB'", "-fps_mode", "passthrough", "-c:v", "libx264", "-qp", "0"])
    # A phone clip stored landscape with 90 degrees of display rotation side data.
    ffmpeg(out / "rotated.mp4", marked_frames(12, 16), "30",
           ["-c:v", "libx264", "-qp", "0"])
    set_mp4_rotation_90(out / "rotated.mp4")
    # AV1 in WebM: opens and states its frame count, but the pip OpenCV wheels have no AV1 decoder.
    ffmpeg(out / "av1.webm", grey_frames(10, 20), "24", ["-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "30"])
    # A JPEG stored landscape with EXIF orientation 6 (display rotated 90 degrees clockwise).
    image = np.full((HEIGHT, WIDTH), 90, np.uint8)
    image[: HEIGHT // 2, : WIDTH // 2] = 250
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = encoded.tobytes()
    (out / "exif6.jpg").write_bytes(data[:2] + exif_orientation_segment(6) + data[2:])
    # 16-bit RGB PNG: a ramp over the whole 16-bit range in each channel.
    ramp = np.linspace(0, 65535, 40 * 30 * 3).round().astype(np.uint16).reshape(30, 40, 3)
    assert cv2.imwrite(str(out / "deep16.png"), ramp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    make(parser.parse_args().out)
