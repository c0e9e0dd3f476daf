"""Integrity of JPEG and PNG files, checked before decoding, the same way on every OpenCV version.

OpenCV's answer to a broken file depends on its version: 4.9 and 4.10 decode a JPEG cut to 60% of its bytes to a
full-size image whose missing rows are zeros or leftover memory, 4.13 and later refuse it without a reason, and
every version decodes a JPEG whose scan data libjpeg reports as corrupt (it only prints a warning). So the file
is checked first, by its content (the extension may be `.jfif` or `.jpe`):

- JPEG: the segments are walked to the end-of-image marker (FF D9); a file that ends before it is truncated.
  Then the file is decoded by libjpeg-turbo (simplejpeg, strict) with every warning an error: a warning such as
  "Corrupt JPEG data: premature end of data segment" makes it corrupt.
- PNG: every chunk must fit in the file and match its CRC-32, up to the IEND chunk (PNG specification, section
  5.3); a file that ends before IEND is truncated, a CRC that does not match is corrupt.

Each check returns None for a sound file, or the reason starting with "truncated" or "corrupt".
"""

from __future__ import annotations

import struct
import zlib

import simplejpeg

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_EOI, _SOS = 0xD9, 0xDA
# Markers without a length field: TEM, RST0-RST7 (and SOI, EOI).
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def file_problem(data: bytes) -> str | None:
    """The integrity problem of an image file's bytes (JPEG or PNG, told by the signature), or None.

    Other formats are not checked here (OpenCV 4.13 and later refuse them truncated).
    """
    if data.startswith(JPEG_SOI):
        return jpeg_problem(data)
    if data.startswith(PNG_SIGNATURE):
        return png_problem(data)
    return None


def jpeg_problem(data: bytes) -> str | None:
    """None for a whole JPEG that libjpeg-turbo decodes without a warning; else why it is truncated or corrupt."""
    end = _jpeg_end(data)
    if isinstance(end, str):
        return end
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY", strict=True)
    except ValueError as error:
        return f"corrupt JPEG: libjpeg-turbo reports {str(error).strip()!r}"
    return None


def _jpeg_end(data: bytes) -> int | str:
    """Offset just past the end-of-image marker, or the reason the JPEG is truncated or corrupt.

    Segments (marker, 2-byte big-endian length) are skipped by their length; after a start-of-scan segment the
    entropy-coded data runs to the next marker that is not a stuffed 0xFF00, a fill byte or a restart marker
    (ITU-T T.81, B.1.1.2 and B.1.1.5).
    """
    position = 2
    size = len(data)
    while True:
        if position + 2 > size:
            return f"truncated JPEG: the file ends after {size} bytes, before the end-of-image marker (FF D9)"
        if data[position] != 0xFF:
            return f"corrupt JPEG: no marker at byte {position} (0x{data[position]:02X} instead of 0xFF)"
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == _EOI:
            return position + 2
        if marker in _STANDALONE:
            position += 2
            continue
        if position + 4 > size:
            return f"truncated JPEG: the file ends inside the marker 0xFF{marker:02X} at byte {position}"
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if length < 2:
            return f"corrupt JPEG: marker 0xFF{marker:02X} at byte {position} has length {length}"
        position += 2 + length
        if position > size:
            return f"truncated JPEG: the file ends inside the segment of marker 0xFF{marker:02X}"
        if marker == _SOS:
            position = _scan_end(data, position)


def _scan_end(data: bytes, position: int) -> int:
    """Offset of the first marker after the entropy-coded data starting at `position` (len(data) if none)."""
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data)
        following = data[position + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed 0xFF, restart marker
            position += 2
        elif following == 0xFF:  # fill byte
            position += 1
        else:
            return position


def png_problem(data: bytes) -> str | None:
    """None when every chunk of a PNG fits and matches its CRC up to IEND; else why it is truncated or corrupt."""
    position = len(PNG_SIGNATURE)
    size = len(data)
    while position + 8 <= size:
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        name = kind.decode("latin-1")
        end = position + 12 + length
        if end > size:
            return f"truncated PNG: the file ends inside chunk {name} (byte {position}, {length} data bytes)"
        (stored,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(data[position + 4:end - 4]) != stored:
            return f"corrupt PNG: CRC mismatch in chunk {name} at byte {position}"
        if kind == b"IEND":
            return None
        position = end
    return f"truncated PNG: the file ends after {size} bytes, before the IEND chunk"
