"""The per-layer trace of every variant on one image and one video: `python -m tests.faults.trace_table`.

Prints the Markdown table of docs/detection.md ("Per-layer trace"), float32 and bfloat16 on the CPU.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from vitparity.builtin import BUILTIN_MEDIA
from vitparity.extract import TEMPORAL_CONTEXT, prepare_sample
from vitparity.media import load_media
from vitparity.trace import trace_layers

from . import VARIANTS, load_variant_models

MEDIA = {"image": "coffee_small.jpg", "video": "coffee_zoom.mp4"}  # 5x7 patches; 4 frames of 8x12 patches
NUM_FRAMES = 4


def _cell(trace) -> str:
    if trace.first_divergence is None:
        return "none"
    rows = {row.index: row for row in trace.rows}
    row = rows.get(trace.first_divergence)
    cos = f" ({row.min_cos:.3f})" if row is not None else ""
    patterns = "; ".join(f'"{name}"' for name in trace.pattern_names)
    return f"[{trace.first_divergence}]{cos}" + (f" {patterns}" if patterns else "")


def main() -> int:
    header = ["variant", "kind", "dtype", "image: first divergence", "video: first divergence"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as root:
        for dtype in (torch.float32, torch.bfloat16):
            samples = {
                kind: prepare_sample(load_media(BUILTIN_MEDIA / name, num_frames=NUM_FRAMES), patch_size=14,
                                     dtype=dtype, name=kind)
                for kind, name in MEDIA.items()
            }
            for variant in VARIANTS:
                hf, packing = load_variant_models(variant, Path(root) / str(dtype), dtype)
                cells = [_cell(trace_layers(hf, packing, s, temporal_context=TEMPORAL_CONTEXT)) for s in samples.values()]
                print(f"| `{variant.name}` | {variant.kind} | {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
