"""The release's codec asset folders: a video's codec-style selection as its LLaVA pre-computation writes it.

Layout of one folder (one video):
- `mosaic_000.jpg ... mosaic_{num_images-1}.jpg`: square frames of hb x wb patches; patch j of mosaic i (row
  j // wb, column j % wb) holds the patch at row i*S + j of the positions (S = hb * wb);
- `positions_thw.npy`: (num_images * S, 3) integers, (t, h, w) on the virtual `seq_len_frames` grid;
- `visible_indices.npy`: (num_images * S,) integers, t*S + h*wb + w;
- `frame_ids.npy`: (seq_len_frames,) integers, the sampled frame of each t;
- `meta.json`: at least seq_len_frames, num_images, patch_size, hb, wb (other keys are kept as metadata).

The non-packing model takes the mosaics as (1, C, num_images, H, W) with `patch_positions` (1, N, 3); the packing
model the mosaics' patches, `grid_thw` (num_images, hb, wb) and the positions.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .extract import CLIP_NORMALIZATION, Normalization, Sample, input_sizes, normalize
from .media import Media, MediaError, load_image
from .snapshots import file_sha256

META = "meta.json"
POSITIONS = "positions_thw.npy"
VISIBLE = "visible_indices.npy"
FRAME_IDS = "frame_ids.npy"
MOSAIC = "mosaic_{:03d}.jpg"
LAYOUT = (META, POSITIONS, VISIBLE, FRAME_IDS)
META_KEYS = ("seq_len_frames", "num_images", "patch_size", "hb", "wb")


@dataclass
class AssetMedia(Media):
    """A codec asset folder's mosaics (num_images, H, W, 3) uint8 and the (N, 3) int64 positions of their tokens."""

    positions: np.ndarray | None = None


def is_asset_folder(path: Path) -> bool:
    """A folder holding any file of the layout (it is then checked whole: a missing file is an error)."""
    return path.is_dir() and any((path / name).exists() for name in (*LAYOUT, MOSAIC.format(0)))


def read_meta(folder: Path) -> dict:
    """meta.json with its required whole-number keys checked; MediaError naming the file otherwise."""
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise MediaError(path, "missing (a codec asset folder needs " + ", ".join(LAYOUT) + " and its mosaics)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MediaError(path, f"unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise MediaError(path, "not a JSON object")
    for key in META_KEYS:
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MediaError(path, f"{key} must be a positive whole number, got {value!r}")
    return meta


def estimated_tokens(folder: Path) -> int:
    """num_images * hb * wb from meta.json, or 0 when it cannot be read (the case then fails when it is loaded)."""
    try:
        meta = read_meta(folder)
    except MediaError:
        return 0
    return meta["num_images"] * meta["hb"] * meta["wb"]


def _array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """An integer .npy of exactly `shape`, as int64; MediaError naming the file otherwise."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MediaError(path, "missing") from None
    except (OSError, ValueError) as err:
        raise MediaError(path, f"unreadable: {err}") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise MediaError(path, f"must hold integers, got dtype {array.dtype}")
    if array.shape != shape:
        raise MediaError(path, f"shape {array.shape}, expected {shape}")
    return array.astype(np.int64)


def load_assets(folder: Path, *, patch_size: int) -> AssetMedia:
    """The folder's mosaics (num_images, H, W, 3) uint8 and the positions (N, 3) int64 of their tokens, checked:
    MediaError naming the file and what is wrong when a file is missing or unreadable, the patch size differs
    from the model's, the positions do not match the mosaics' token count or lie outside the grid or the temporal
    context, or visible_indices disagree with the positions."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta["patch_size"] != patch_size:
        raise MediaError(folder / META, f"patch_size {meta['patch_size']} differs from the model's {patch_size}")
    count, hb, wb, context = meta["num_images"], meta["hb"], meta["wb"], meta["seq_len_frames"]
    per_mosaic = hb * wb
    height, width = hb * patch_size, wb * patch_size
    mosaics = []
    for index in range(count):
        path = folder / MOSAIC.format(index)
        if not path.exists():
            raise MediaError(path, f"missing (meta.json says num_images {count})")
        frame = load_image(path, patch_size=patch_size).frames
        if frame.shape[:2] != (height, width):
            raise MediaError(path, f"{frame.shape[1]}x{frame.shape[0]} pixels, expected {width}x{height} "
                                   f"(hb {hb} x wb {wb} patches of {patch_size})")
        mosaics.append(frame)
    extra = folder / MOSAIC.format(count)
    if extra.exists():
        raise MediaError(extra, f"more mosaics than meta.json's num_images {count}")
    tokens = count * per_mosaic
    try:
        positions = _array(folder / POSITIONS, (tokens, 3))
    except MediaError as err:
        raise MediaError(err.path, f"{err.reason}: the positions must match the mosaics' {count} x {hb} x {wb} = "
                                   f"{tokens} tokens") from None
    limits = np.array([context, hb, wb])
    outside = np.flatnonzero(((positions < 0) | (positions >= limits)).any(axis=1))
    if outside.size:
        row = outside[0]
        raise MediaError(folder / POSITIONS, f"row {row} (t, h, w) = {tuple(positions[row].tolist())} lies outside "
                                            f"the grid t < {context} (seq_len_frames), h < {hb}, w < {wb} "
                                            f"({outside.size} rows in all)")
    visible = _array(folder / VISIBLE, (tokens,))
    expected = positions[:, 0] * per_mosaic + positions[:, 1] * wb + positions[:, 2]
    wrong = np.flatnonzero(visible != expected)
    if wrong.size:
        row = wrong[0]
        raise MediaError(folder / VISIBLE, f"row {row} is {visible[row]}, but positions_thw.npy row {row} "
                                           f"{tuple(positions[row].tolist())} gives t*S + h*wb + w = {expected[row]} "
                                           f"({wrong.size} rows disagree)")
    frame_ids = _array(folder / FRAME_IDS, (context,))
    metadata = {
        "path": os.fspath(folder), "width": width, "height": height, "codec_assets": {
            key: meta[key] for key in sorted(meta) if isinstance(meta[key], (int, float, str, bool))},
        "frame_indices": frame_ids.tolist(),
    }
    return AssetMedia(os.fspath(folder), "video", np.stack(mosaics), metadata, positions)


def folder_sha256(folder: Path) -> str:
    """sha256 over the name and sha256 of every file of the folder (sorted by name): the digest of its inputs."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()


def prepare_assets_sample(
    media: AssetMedia,
    *,
    patch_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
    normalization: Normalization = CLIP_NORMALIZATION,
) -> Sample:
    """The mosaics normalised as pixels (C, num_images, H, W), grid (num_images, hb, wb), and their positions: a
    sample both models take with explicit positions (the non-packing model only that way)."""
    pixels = normalize(media.frames, dtype=dtype, device=device, normalization=normalization)
    _, t, height, width = pixels.shape
    grid = (t, height // patch_size, width // patch_size)
    metadata = {**input_sizes(media.metadata, width, height), "tensor_shape": [1, *pixels.shape],
                "grid_thw": list(grid)}
    frames = sorted({int(x) for x in media.positions[:, 0]})
    return Sample(name or media.path, "video", pixels, grid, frames, metadata,
                  positions=torch.from_numpy(media.positions).to(device))
