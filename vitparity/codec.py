"""Codec-style sparse token selection: the salient patches of many frames, at irregular (t, h, w) positions.

The release's codec pre-computation scores each patch of `seq_len_frames` (64) uniformly sampled frames by fused
motion-vector and residual energy from the HEVC stream, normalised per frame by its 95th percentile, keeps the
first frame whole and fills the rest of the budget by a global top-k over the other frames, sorted by (t, h, w).
Here pixel residuals of decoded frames stand in for the codec's motion vectors and residuals (no bitstream is
read), so the selection is the same for every container and codec of the same pixels:

- the frames are the `context` (64) frames sampled uniformly over the whole file (`media.sample_frame_indices`:
  a short file repeats frames), at native resolution;
- a patch's energy is the mean absolute change of its luma (BT.601: 0.299 R + 0.587 G + 0.114 B, on 0..255)
  from the previous sampled frame; each frame's energies are divided by their 95th percentile (by their maximum
  when that is 0; a frame without change keeps zeros);
- the first frame is kept whole; the remaining `(budget_frames - 1) * h * w` tokens are the highest normalised
  energies over frames 1..context-1, ties going to the lower (t, h, w);
- the kept tokens are sorted by (t, h, w).

The three ways the release calls the models on such a selection (each a `Sample` of this module):
- non-packing, sparse `visible_indices` into the full context grid (t * h*w + h_i * w + w_i);
- non-packing on *mosaic* frames: the kept patches laid out row-major, in order, in `budget_frames` frames of
  the video's own patch grid, with each patch's original (t, h, w) as `patch_positions`;
- packing: the mosaic's patches, `grid_thw` (budget_frames, h, w) and the same positions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .extract import CLIP_NORMALIZATION, TEMPORAL_CONTEXT, Normalization, Sample, input_sizes, normalize, patchify
from .media import Media

RULE = ("first of {context} uniformly sampled frames whole, then a global top-k of per-frame p95-normalised mean "
        "absolute luma change (BT.601) against the previous sampled frame; ties to the lower (t, h, w); "
        "sorted by (t, h, w)")
LUMA = (0.299, 0.587, 0.114)
PERCENTILE = 95.0


@dataclass(frozen=True)
class CodecSelection:
    """The kept tokens of a video's context grid (t, h, w) = `grid`: `positions` (K, 3) int64, sorted by (t, h, w),
    K = budget_frames * h * w."""

    positions: np.ndarray
    grid: tuple[int, int, int]
    budget_frames: int

    @property
    def visible_indices(self) -> np.ndarray:
        """(K,) int64 indices into the frame-major, row-major context grid: t * h*w + h_i * w + w_i."""
        _, h, w = self.grid
        t, hh, ww = self.positions.T
        return t * (h * w) + hh * w + ww

    @property
    def digest(self) -> str:
        """sha256 of the positions as little-endian int64 (first 16 hex digits): names a changed selection."""
        return hashlib.sha256(self.positions.astype("<i8").tobytes()).hexdigest()[:16]

    def metadata(self) -> dict:
        """The selection as recorded with features and goldens: rule, budget, token count and digest."""
        context = self.grid[0]
        return {"rule": RULE.format(context=context), "context_frames": context, "budget_frames": self.budget_frames,
                "tokens": int(self.positions.shape[0]), "indices_sha256": self.digest}


def luma(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) -> float64 luma (T, H, W) on 0..255 (BT.601 weights)."""
    return frames.astype(np.float64) @ np.asarray(LUMA)


def residual_energy(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """(T, h, w) float64: mean absolute luma change of each patch from the previous frame (frame 0: zeros),
    each frame divided by its 95th percentile (its maximum when that is 0; zeros stay zeros).

    frames: uint8 RGB (T, H, W, 3), H and W multiples of `patch_size`.
    """
    t, height, width, _ = frames.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"frames of {height}x{width} are not aligned to patch size {p}")
    y = luma(frames)
    change = np.zeros_like(y)
    change[1:] = np.abs(y[1:] - y[:-1])
    energy = change.reshape(t, height // p, p, width // p, p).mean(axis=(2, 4))
    for frame in energy[1:]:
        scale = np.percentile(frame, PERCENTILE)
        scale = scale if scale > 0 else frame.max()
        if scale > 0:
            frame /= scale
    return energy


def select_tokens(frames: np.ndarray, patch_size: int, budget_frames: int) -> CodecSelection:
    """The codec-style selection (module docstring) of `budget_frames` frames' worth of tokens.

    frames: uint8 RGB (T, H, W, 3), the T context frames. ValueError when the budget is not in [1, T].
    """
    t = frames.shape[0]
    if not 1 <= budget_frames <= t:
        raise ValueError(f"a codec budget of {budget_frames} frames' worth of tokens does not fit {t} context frames")
    energy = residual_energy(frames, patch_size)
    _, h, w = energy.shape
    per_frame = h * w
    rest = energy[1:].reshape(-1)
    order = np.argsort(-rest, kind="stable")  # stable: equal energies keep the (t, h, w) order
    chosen = np.sort(order[: (budget_frames - 1) * per_frame]) + per_frame
    flat = np.concatenate([np.arange(per_frame), chosen]).astype(np.int64)
    positions = np.stack([flat // per_frame, flat % per_frame // w, flat % w], axis=1)
    return CodecSelection(positions, (t, h, w), budget_frames)


def mosaic(pixels: torch.Tensor, selection: CodecSelection, patch_size: int) -> torch.Tensor:
    """The kept patches of the context `pixels` (C, T, H, W) laid out row-major, in order, in `budget_frames`
    frames of the same patch grid: (C, budget_frames, H, W), same dtype and device."""
    index = torch.from_numpy(selection.visible_indices).to(pixels.device)
    return unpatchify(patchify(pixels, patch_size)[index], selection.budget_frames, pixels.shape[0], patch_size,
                      selection.grid[1:])


def unpatchify(tokens: torch.Tensor, frames: int, channels: int, patch_size: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Tokens (frames*h*w, C*p*p) in (C, p, p) order laid out frame-major, row-major: (C, frames, h*p, w*p)."""
    h, w = grid_hw
    p = patch_size
    return tokens.reshape(frames, h, w, channels, p, p).permute(3, 0, 1, 4, 2, 5).reshape(channels, frames, h * p, w * p)


def permuted(sample: Sample, permutation: torch.Tensor) -> Sample:
    """A sparse (codec-style) sample with its tokens in another order: the mosaic re-laid in that order, and its
    positions and visible indices permuted with them. Token i of the result is token permutation[i] of `sample`.

    permutation: (K,) int64 on the host. ValueError for a sample without explicit positions and sparse indices.
    """
    if sample.positions is None or sample.context is None:
        raise ValueError(f"{sample.name}: only a sparse sample (explicit positions and visible_indices) is permuted")
    c = sample.pixels.shape[0]
    t, h, w = sample.grid
    p = sample.pixels.shape[2] // h
    pixels = unpatchify(patchify(sample.pixels, p)[permutation.to(sample.pixels.device)], t, c, p, (h, w))
    return Sample(sample.name, sample.kind, pixels, sample.grid, sample.frame_positions, dict(sample.metadata),
                  positions=sample.positions[permutation.to(sample.positions.device)], context=sample.context,
                  visible_indices=sample.visible_indices[permutation])


def prepare_codec_sample(
    media: Media,
    *,
    patch_size: int,
    budget_frames: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
    normalization: Normalization = CLIP_NORMALIZATION,
) -> Sample:
    """A video's context frames (`media`: every sampled frame, e.g. 64) -> the codec-style sample: the mosaic as
    pixels (C, budget_frames, H, W), the positions of its tokens, and the context with the sparse indices.

    ValueError when the media is not a video, is not patch-aligned, or the budget does not fit.
    """
    if media.kind != "video":
        raise ValueError(f"{media.path}: a codec-style case needs a video, got {media.kind}")
    selection = select_tokens(media.frames, patch_size, budget_frames)
    context = normalize(media.frames, dtype=dtype, device=device, normalization=normalization)
    _, t, height, width = context.shape
    pixels = mosaic(context, selection, patch_size)
    grid = (budget_frames, height // patch_size, width // patch_size)
    metadata = {**input_sizes(media.metadata, width, height), "tensor_shape": [1, *pixels.shape],
                "grid_thw": list(grid), "codec_selection": selection.metadata()}
    return Sample(
        name or media.path, "video", pixels, grid, sorted({int(x) for x in selection.positions[:, 0]}), metadata,
        positions=torch.from_numpy(selection.positions).to(device),
        context=context, visible_indices=torch.from_numpy(selection.visible_indices),
    )


def token_permutation(count: int, seed: int = 0) -> torch.Tensor:
    """A fixed random order of `count` tokens ((count,) int64, host): the same on every machine."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def context_frames(temporal_context: int | None) -> int:
    """Frames a codec-style case samples: the model's temporal context (64 when its RoPE uses the frame count)."""
    return temporal_context or TEMPORAL_CONTEXT
