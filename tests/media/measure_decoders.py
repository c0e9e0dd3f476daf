"""Measure how the importable OpenCV decodes the colour charts, against ffmpeg's rgb24 decode of each.

This is the measurement behind the OpenCV floor in pyproject.toml. It reads the chart clips with a plain
cv2.VideoCapture (no vitparity code, which refuses OpenCV below the floor), so any version can be measured:

    pip install --target /tmp/cv2-4.12 opencv-python-headless==4.12.0.88
    PYTHONPATH=/tmp/cv2-4.12 python tests/media/measure_decoders.py

Prints one line per chart: the largest difference from ffmpeg over the whole frame, in 8-bit levels, and the
decoded value of the pure red patch.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    avcodec = re.search(r"avcodec:\s*YES \(([^)]*)\)", cv2.getBuildInformation())
    print(f"OpenCV {cv2.__version__}, FFmpeg avcodec {avcodec.group(1) if avcodec else 'none'}")
    for clip in sorted(HERE.glob("chart_*.*")):
        if clip.suffix == ".png":
            continue
        reference = cv2.imread(str(clip) + ".ffmpeg_rgb24.png", cv2.IMREAD_COLOR)
        capture = cv2.VideoCapture(str(clip), cv2.CAP_FFMPEG)
        ok, frame = capture.read()
        capture.release()
        if not ok:
            print(f"{clip.name}: no frame decodes")
            continue
        difference = np.abs(frame.astype(np.int16) - reference.astype(np.int16)).max()
        red = frame[16, 16, ::-1].tolist()  # RGB of the centre of the pure red patch
        print(f"{clip.name}: max |OpenCV - ffmpeg rgb24| = {difference} levels; red patch {red} "
              f"(ffmpeg {reference[16, 16, ::-1].tolist()})")


if __name__ == "__main__":
    main()
