"""Image and video sizes read without decoding the pixels, for planning work before any forward pass.

JPEG and PNG sizes come from their headers; other image formats are decoded; videos are opened and their
container's frame size read. A file that cannot be probed gives None: its case fails later, when it is decoded
(`vitparity.media_check`, before any model loads, names it with what the decoder wrote). What OpenCV and FFmpeg
write to stderr while probing is dropped.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2

from .media_check import captured_stderr

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): they carry the frame size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return (width, height) if width and height else None
        position += 2 + length
    return None


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of an image file, or None when it cannot be read. EXIF rotation may swap the two."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return None
    if head.startswith(_PNG_SIGNATURE) and len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return (width, height) if width and height else None
    if head.startswith(b"\xff\xd8"):
        size = _jpeg_size(head)
        if size is not None:
            return size
        with open(path, "rb") as handle:  # a large EXIF block before the frame header
            size = _jpeg_size(handle.read())
        if size is not None:
            return size
    with captured_stderr():
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if image is None else (image.shape[1], image.shape[0])


def video_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of a video's frames as its container states them, or None when it cannot be opened."""
    with captured_stderr():
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            return None
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        return (width, height) if width > 0 and height > 0 else None
    finally:
        capture.release()
