"""The per-layer trace of every variant on one image and one video: `python -m tests.faults.trace_table`.

Prints the two Markdown tables of docs/detection.md ("Per-layer trace"), float32 and bfloat16 on the CPU: the first
divergence of each variant, then the step each fault's trace names against its true step (`Variant.step`). A fault
is traced where it shows: the video alone, else the image alone, else the image with the float32 bars (faults below
the threshold), else the video inside a pack with the image (faults between samples).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from vitparity.builtin import BUILTIN_MEDIA
from vitparity.extract import TEMPORAL_CONTEXT, prepare_sample
from vitparity.media import load_media
from vitparity.precision import Bars
from vitparity.trace import LayerTrace, trace_layers

from . import VARIANTS, names_step, load_variant_models

MEDIA = {"image": "coffee_small.jpg", "video": "coffee_zoom.mp4"}  # 5x7 patches; 4 frames of 8x12 patches
NUM_FRAMES = 4


def _cell(trace: LayerTrace) -> str:
    if trace.first_divergence is None:
        return "none"
    rows = {row.index: row for row in trace.rows}
    row = rows.get(trace.first_divergence)
    cos = f" ({row.min_cos:.3f})" if row is not None else ""
    patterns = "; ".join(f'"{name}"' for name in trace.pattern_names)
    return f"[{trace.first_divergence}]{cos}" + (f" {patterns}" if patterns else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _step_trace(hf, packing, samples: dict, dtype: str) -> tuple[str, LayerTrace]:
    """Where the fault shows, in the order of the module docstring, and the trace there."""
    traced = [(kind, trace_layers(hf, packing, sample, temporal_context=TEMPORAL_CONTEXT))
              for kind, sample in reversed(samples.items())]
    if dtype == "float32":
        traced.append(("image, float32 bars", trace_layers(hf, packing, samples["image"], bars=Bars.for_dtype(dtype),
                                                           temporal_context=TEMPORAL_CONTEXT)))
    traced.append(("video in a pack", trace_layers(hf, packing, samples["video"], pack=list(samples.values()),
                                                   temporal_context=TEMPORAL_CONTEXT)))
    return next(((kind, trace) for kind, trace in traced if trace.first_divergence is not None), traced[0])


def _verdict(named: str, variant, dtype: str) -> str:
    """`yes` / `NO`, or why there is nothing to name: a fault the trace cannot see where it looks (below every
    threshold, off the features' path, or on an input path the trace does not take), or one below the 16-bit
    bars (the float32 probe locates it in float32)."""
    if named == "none" and variant.step == "none":
        return "n/a: " + ("an input path the trace does not take" if variant.select else "nothing diverges")
    if named == "none" and dtype != "float32":
        return "n/a: below the bfloat16 bars (named in float32)"
    return "yes" if names_step(named, variant.step) else "NO"


def main() -> int:
    layers = [["variant", "kind", "dtype", "image: first divergence", "video: first divergence"]]
    steps = [["variant", "dtype", "traced", "step named", "true step", "named it"]]
    with tempfile.TemporaryDirectory() as root:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            samples = {
                kind: prepare_sample(load_media(BUILTIN_MEDIA / file, num_frames=NUM_FRAMES), patch_size=14,
                                     dtype=dtype, name=kind)
                for kind, file in MEDIA.items()
            }
            for variant in VARIANTS:
                hf, packing = load_variant_models(variant, Path(root) / name, dtype)
                cells = [_cell(trace_layers(hf, packing, s, temporal_context=TEMPORAL_CONTEXT)) for s in samples.values()]
                layers.append([f"`{variant.name}`", variant.kind, name, *cells])
                if variant.kind == "fault":
                    where, trace = _step_trace(hf, packing, samples, name)
                    named = trace.divergence()
                    steps.append([f"`{variant.name}`", name, where, named, variant.step, _verdict(named, variant, name)])
    for table in (layers, steps):
        print("\n".join([_row(table[0]), "|" + "---|" * len(table[0]), *(_row(r) for r in table[1:])]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
