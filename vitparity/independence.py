"""Companion swap: a packed sample's features must not depend, by a single bit, on the other samples.

The packing model runs a pack twice: as given, and with the pixels of the samples outside a kept set replaced by
different pixels of the same shapes (seeded random frames, normalised like real media). Same model, dtype,
device, kernels and token counts, so each kept sample's computation is the same sequence of operations on the
same values: its features must be bit-identical (torch.equal). A cosine threshold cannot see a leak of 1e-6 of
the neighbours' values; this can. `alternate_halves` covers a whole pack in two swaps: the even positions kept
(the odd ones swapped), then the odd ones, so every sample is queried with its neighbours on both sides changed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

import numpy as np
import torch

from .extract import Sample, extract_packing, normalize
from .models.packed_attention import packed_implementation


@dataclass(frozen=True)
class SwapResult:
    """Outcome of one companion swap for the sample at `index` of a pack."""

    name: str
    index: int
    pack_size: int
    identical: bool  # torch.equal of the queried sample's features before and after the swap
    max_abs: float  # largest absolute difference of those features (0.0 when identical)
    companions_changed: bool  # the swap changed the other samples' features (it did swap something)
    backend: str  # the packed attention backend that ran ("n/a" for a model without the attribute)
    dtype: str
    device: str

    @property
    def passed(self) -> bool:
        return self.identical and self.companions_changed

    def format(self) -> str:
        where = (
            f"{self.name} (index {self.index} of a pack of {self.pack_size}; "
            f"{self.backend}, {self.dtype}, {self.device})"
        )
        if not self.companions_changed:
            return f"companion swap of {where}: FAIL: the swap did not change the other samples' features"
        if self.identical:
            return f"companion swap of {where}: PASS: features bit-identical"
        return (
            f"companion swap of {where}: FAIL: features changed by up to {self.max_abs:.3e} "
            "when only the other samples' pixels changed"
        )

    def properties(self) -> list[tuple[str, str]]:
        """Name / value pairs for JUnit."""
        prefix = f"companion_swap[{self.name}]"
        return [
            (f"{prefix} identical", "yes" if self.identical else "no"),
            (f"{prefix} max_abs", f"{self.max_abs:.3e}"),
            (f"{prefix} backend", f"{self.backend}, {self.dtype}, {self.device}"),
        ]


def replacement_pixels(sample: Sample, seed: int) -> torch.Tensor:
    """Seeded random uint8 frames of the sample's shape, normalised like media, in its dtype and device."""
    _, t, height, width = sample.pixels.shape
    frames = np.random.default_rng(seed).integers(0, 256, size=(t, height, width, 3), dtype=np.uint8)
    return normalize(frames, dtype=sample.pixels.dtype, device=sample.pixels.device)


def swap_companions(samples: list[Sample], kept: Collection[int], *, seed: int = 0) -> list[Sample]:
    """The pack with every sample outside `kept` given replacement pixels (shapes and positions kept)."""
    return [
        sample if i in kept else replace(sample, pixels=replacement_pixels(sample, seed + i))
        for i, sample in enumerate(samples)
    ]


def alternate_halves(pack_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The even and the odd positions of a pack: two swaps that query every sample."""
    return tuple(range(0, pack_size, 2)), tuple(range(1, pack_size, 2))


def companion_swap(
    model: torch.nn.Module, samples: list[Sample], kept: Collection[int], *, seed: int = 0,
    before: list[torch.Tensor] | None = None,
) -> list[SwapResult]:
    """Run the packing model on the pack and on the pack with every sample outside `kept` swapped; compare each
    kept sample's features (one SwapResult each, in the order of `kept`).

    before: the pack's features from `extract_packing(model, samples)` when the caller has them already (one
    forward instead of two); they must come from the same model, samples, dtype and device.
    """
    kept = sorted(set(kept))
    if len(samples) < 2:
        raise ValueError(f"a companion swap needs a pack of at least 2 samples, got {len(samples)}")
    if not kept or len(kept) == len(samples) or not all(0 <= i < len(samples) for i in kept):
        raise IndexError(f"kept positions {kept} must be some, not all, of the pack's 0..{len(samples) - 1}")
    if before is None:
        before = extract_packing(model, samples)
    elif [tuple(f.shape[:1]) for f in before] != [(s.num_tokens,) for s in samples]:
        raise ValueError("before: one feature tensor per sample of the pack, with its number of tokens, expected")
    after = extract_packing(model, swap_companions(samples, kept, seed=seed))
    changed = all(not torch.equal(a, b) for i, (a, b) in enumerate(zip(before, after)) if i not in kept)
    parameter = next(model.parameters())
    backend = packed_implementation(model) or "n/a"
    results = []
    for index in kept:
        identical = torch.equal(before[index], after[index])
        results.append(SwapResult(
            name=samples[index].name, index=index, pack_size=len(samples), identical=identical,
            max_abs=0.0 if identical else float((before[index] - after[index]).abs().max()),
            companions_changed=changed, backend=backend, dtype=str(parameter.dtype).removeprefix("torch."),
            device=str(parameter.device),
        ))
    return results
