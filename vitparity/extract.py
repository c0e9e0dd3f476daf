"""The extraction protocol: media -> model inputs -> penultimate features, for both implementations.

Non-packing side: images as (1, C, H, W); videos through the release's temporal context (the T sampled
frames scattered into a zero tensor of `temporal_context` frames at interpolated positions, plus
`visible_indices`). Packing side: patches flattened in (C, p, p) order, `grid_thw`, and `patch_positions`
carrying the same interpolated frame positions; several samples go through one forward pass.
Both return `hidden_states[-2]` per sample as float32 (N, D).

The project's own model classes (vitparity.models, exactly those classes) stop after the penultimate layer
(`output_layer=-2`) and keep no other hidden state; any other class, remote code and subclasses included, runs
the whole forward with `output_hidden_states=True`, since its forward may not take that argument or may change
what hidden_states holds. `full_forward=True` forces the whole forward (trace.py always uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .choices import TEMPORAL_CONTEXT
from .media import Media
from .models import MODEL_TYPES
from .models.packed_attention import host_to_device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURE_LAYER = -2
# Classes whose forward takes `output_layer` and stops there: the project's own, not their subclasses.
EARLY_EXIT_CLASSES = frozenset(model_class for _, model_class, _ in MODEL_TYPES.values())


def temporal_positions(num_frames: int, context: int = TEMPORAL_CONTEXT) -> list[int]:
    """Positions of T sampled frames in a context of `context` frames: round(i / (T-1) * (context-1))."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames > context:
        raise ValueError(f"{num_frames} frames do not fit a temporal context of {context}")
    if num_frames == 1:
        return [0]
    return [round(i / (num_frames - 1) * (context - 1)) for i in range(num_frames)]


@dataclass
class Sample:
    """One image or video ready for both models."""

    name: str
    kind: str  # "image" or "video"
    pixels: torch.Tensor  # (C, T, H, W) normalised, model dtype, on the device
    grid: tuple[int, int, int]  # (t, h, w) in patches
    frame_positions: list[int]  # temporal RoPE position of each frame
    metadata: dict = field(default_factory=dict)
    # Explicit (N, 3) long (t, h, w) positions of the tokens of `pixels` (None: the grid with frame_positions).
    positions: torch.Tensor | None = None
    # A sparse sample (codec-style): the context frames (C, T_context, H, W) and the (K,) int64 host indices of its
    # tokens in their grid, in the order of the tokens of `pixels` (None: the frames are scattered as a whole).
    context: torch.Tensor | None = None
    visible_indices: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass(frozen=True)
class Normalization:
    """How uint8 RGB becomes model input: `value * rescale`, then `(x - mean) / std` per channel.

    `source` says where the values came from (a preprocessor_config.json, or the CLIP defaults).
    """

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale: float = 1 / 255
    source: str = "CLIP defaults"

    def same_values(self, other: "Normalization") -> bool:
        return (self.mean, self.std, self.rescale) == (other.mean, other.std, other.rescale)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "rescale": self.rescale, "source": self.source}


CLIP_NORMALIZATION = Normalization()


def normalize(
    frames: np.ndarray,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    normalization: Normalization = CLIP_NORMALIZATION,
) -> torch.Tensor:
    """uint8 RGB (H, W, 3) or (T, H, W, 3) -> (C, T, H, W): rescaled, then mean / std per channel, in `dtype`.

    The rescale goes through a 256-entry table computed in float64, so that 1/255 gives exactly RGB / 255 in float32;
    the mean and std are applied to that table in float32 (the same operations as on every pixel, done once per
    value), and each frame is then one gather (no float copy of the whole clip before the result).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 RGB frames (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    table = (torch.arange(256, dtype=torch.float64) * normalization.rescale).to(torch.float32).to(x.device)
    mean = torch.tensor(normalization.mean, device=x.device).view(3, 1)
    std = torch.tensor(normalization.std, device=x.device).view(3, 1)
    per_channel = (table.view(1, 256) - mean) / std  # (3, 256) float32
    t, h, w, _ = x.shape
    out = torch.empty((3, t, h * w), dtype=torch.float32, device=x.device)
    for index in range(t):
        torch.gather(per_channel, 1, x[index].view(h * w, 3).T.long(), out=out[:, index])
    return out.view(3, t, h, w).to(dtype)


def prepare_sample(
    media: Media,
    *,
    patch_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    temporal_context: int | None = TEMPORAL_CONTEXT,
    name: str | None = None,
    normalization: Normalization = CLIP_NORMALIZATION,
) -> Sample:
    """Normalise a loaded image or video and compute its patch grid and frame positions.

    temporal_context None places the frames at 0..T-1 (a model whose RoPE uses the frame count).
    """
    pixels = normalize(media.frames, dtype=dtype, device=device, normalization=normalization)
    _, t, height, width = pixels.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"{media.path}: {height}x{width} is not aligned to patch size {patch_size}")
    if media.kind == "video":
        positions = temporal_positions(t, temporal_context or t)
    else:
        positions = [0]
    grid = (t, height // patch_size, width // patch_size)
    metadata = {**input_sizes(media.metadata, width, height), "tensor_shape": [1, *pixels.shape], "grid_thw": list(grid),
                "temporal_positions": positions}
    return Sample(name or media.path, media.kind, pixels, grid, positions, metadata)


def input_sizes(media_metadata: dict, width: int, height: int) -> dict:
    """A decoded input's metadata with the sizes as the release's extraction tool records them in metadata.json:
    `width` / `height` the size the model sees (pixels, after scaling and alignment) and `orig_width` /
    `orig_height` the native size (`media_metadata`'s `width` / `height`; the size seen when it has none, as for
    frames made in memory); every other key of `media_metadata` (`scaled_*`, `aligned_*`, ...) kept."""
    return {**media_metadata, "orig_width": media_metadata.get("width", int(width)),
            "orig_height": media_metadata.get("height", int(height)), "width": int(width), "height": int(height)}


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, T, H, W) -> (T*h*w, C*p*p): frame-major, row-major tokens, each patch in (C, p, p) order."""
    c, t, height, width = pixels.shape
    p = patch_size
    h, w = height // p, width // p
    return pixels.reshape(c, t, h, p, w, p).permute(1, 2, 4, 0, 3, 5).reshape(t * h * w, c * p * p)


def token_positions(sample: Sample) -> torch.Tensor:
    """(N, 3) long (t, h, w) RoPE positions of a sample's tokens: its explicit positions, else the grid with t
    taken from its frame positions."""
    if sample.positions is not None:
        return sample.positions
    return _frame_grid(sample.frame_positions, sample)


def _frame_grid(frames: list[int], sample: Sample) -> torch.Tensor:
    """(N, 3) long (t, h, w) of every token of `sample`'s grid, frame i at temporal position frames[i], on its
    device (built on the host)."""
    _, h, w = sample.grid
    grids = torch.meshgrid(torch.tensor(frames), torch.arange(h), torch.arange(w), indexing="ij")
    return host_to_device(torch.stack(grids, dim=-1).reshape(-1, 3), sample.pixels.device)


HF_PATHS = ("context", "positions")


def hf_inputs(sample: Sample, dtype: torch.dtype, *, temporal_context: int | None = TEMPORAL_CONTEXT,
              path: str = "context") -> dict:
    """Keyword arguments of the non-packing model's forward for one sample (without output flags).

    path "context" (the release's paths 1 and 3): images as pixel_values (1, C, H, W); videos through the
    temporal context: the model interface takes all `context` frames and only the sample's tokens are listed as
    visible (the model embeds visible patches only): the T sampled frames scattered whole at their positions, or,
    for a sparse sample, its context frames and its `visible_indices` in its token order.
    path "positions" (path 2): the sample's own frames (1, C, T, H, W) and `patch_positions` (1, N, 3), the
    explicit (t, h, w) of each token (`token_positions`). A sample with explicit positions and no context (a codec
    asset folder's mosaics) is called this way on either path.
    Indices are built on the host so that the model checks their range without reading the device.
    """
    pixels = sample.pixels.to(dtype)
    if path == "positions" or (sample.positions is not None and sample.context is None):
        return {"pixel_values": pixels.unsqueeze(0), "patch_positions": token_positions(sample).unsqueeze(0)}
    if path != "context":
        raise ValueError(f"unknown non-packing input path {path!r}; use one of {HF_PATHS}")
    if sample.context is not None:
        return {"pixel_values": sample.context.to(dtype).unsqueeze(0),
                "visible_indices": sample.visible_indices.reshape(1, -1)}
    if sample.kind == "image":
        return {"pixel_values": pixels[:, 0].unsqueeze(0)}
    c, t, height, width = pixels.shape
    context = temporal_context or t
    frame_tokens = sample.grid[1] * sample.grid[2]
    where = torch.tensor(sample.frame_positions)
    full = pixels.new_zeros(1, c, context, height, width)
    full[0, :, host_to_device(where, pixels.device)] = pixels
    visible = (where[:, None] * frame_tokens + torch.arange(frame_tokens)).reshape(1, -1)
    return {"pixel_values": full, "visible_indices": visible}


def batched_hf_inputs(samples: list[Sample], dtype: torch.dtype, *,
                      temporal_context: int | None = TEMPORAL_CONTEXT) -> dict:
    """Keyword arguments of one non-packing forward of several same-size samples as a batch (context path): each
    tensor of `hf_inputs` concatenated along the batch dimension, e.g. pixel_values (B, C, H, W) for images,
    (B, C, 64, H, W) with visible_indices (B, K) for videos, (B, C, T, H, W) with patch_positions (B, N, 3) for
    mosaics. ValueError when the samples' inputs differ in shape (they cannot share a batch)."""
    inputs = [hf_inputs(sample, dtype, temporal_context=temporal_context) for sample in samples]
    shapes = [batch_key(one) for one in inputs]
    if len(set(shapes)) != 1:
        raise ValueError(f"samples of different input shapes cannot share a batch: {sorted(set(shapes))}")
    return {key: torch.cat([one[key] for one in inputs]) for key in inputs[0]}


def batch_key(inputs: dict) -> tuple:
    """What must be equal for two samples' non-packing inputs (`hf_inputs`) to share a batch: each keyword's shape."""
    return tuple(sorted((key, tuple(value.shape)) for key, value in inputs.items()))


def mirrored(sample: Sample) -> Sample:
    """The same sample with every frame flipped left to right (its pixels, and a sparse sample's context frames):
    an input of exactly the same shape, positions and indices but other pixels, the companion of a sample batched
    with no other of its size."""
    context = sample.context.flip(-1) if sample.context is not None else None
    return Sample(f"{sample.name}~mirrored", sample.kind, sample.pixels.flip(-1), sample.grid,
                  list(sample.frame_positions), dict(sample.metadata), sample.positions, context,
                  sample.visible_indices)


def grid_positions(sample: Sample) -> torch.Tensor:
    """(N, 3) long (t, h, w) positions of a sample's tokens from its grid alone, as a packing model given only
    `grid_thw` computes them: t = 0..T-1 (not the 64-frame context's positions), then h and w row-major."""
    return _frame_grid(list(range(sample.grid[0])), sample)


def packing_inputs(samples: list[Sample], patch_size: int, dtype: torch.dtype, *, positions: str = "explicit") -> dict:
    """Keyword arguments of the packing model's forward for samples packed in this order (without output flags).

    positions "explicit": `patch_positions` (N, 3) the samples' own (`token_positions`: a video's 64-frame context
    positions); "grid": `patch_positions` computed from each sample's grid (`grid_positions`); "none": `grid_thw`
    alone, the release's documented call, the model computing the positions itself.
    """
    patches = torch.cat([patchify(s.pixels, patch_size) for s in samples]).to(dtype)
    grid_thw = torch.tensor([s.grid for s in samples], dtype=torch.long)
    if positions == "none":
        return {"hidden_states": patches, "grid_thw": grid_thw}
    if positions not in ("explicit", "grid"):
        raise ValueError(f"unknown packing positions {positions!r}; use explicit, grid or none")
    rows = torch.cat([(token_positions if positions == "explicit" else grid_positions)(s) for s in samples])
    return {"hidden_states": patches, "grid_thw": grid_thw, "patch_positions": rows}


def hidden_states_of(outputs) -> tuple[torch.Tensor, ...]:
    """The `hidden_states` tuple of a model output (a ModelOutput or a plain tuple ending with it)."""
    hidden = outputs.hidden_states if hasattr(outputs, "hidden_states") else outputs[-1]
    if hidden is None or len(hidden) < 2:
        raise RuntimeError("the model returned no hidden_states; it must support output_hidden_states=True")
    return tuple(hidden)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def hf_hidden_states(
    model: torch.nn.Module, sample: Sample, *, temporal_context: int | None = TEMPORAL_CONTEXT, path: str = "context"
) -> tuple[torch.Tensor, ...]:
    """Every hidden state (0: embedding output) of the non-packing model for one sample, each (N, D), model dtype."""
    inputs = hf_inputs(sample, model_dtype(model), temporal_context=temporal_context, path=path)
    hidden = hidden_states_of(model(**inputs, output_hidden_states=True))
    return tuple(h[0] for h in hidden)


def packing_hidden_states(model: torch.nn.Module, samples: list[Sample]) -> tuple[torch.Tensor, ...]:
    """Every hidden state of the packing model for samples packed into one pass, each (sum of N, D), model dtype."""
    inputs = packing_inputs(samples, model.config.patch_size, model_dtype(model))
    hidden = hidden_states_of(model(**inputs, output_hidden_states=True))
    total = inputs["hidden_states"].shape[0]
    for index, h in enumerate(hidden):
        if h.shape[0] != total:
            raise RuntimeError(f"packing model returned {h.shape[0]} tokens in hidden_states[{index}] for {total} input patches")
    return hidden


def stops_early(model: torch.nn.Module) -> bool:
    """Whether features of `model` come from a forward that stops after the penultimate layer."""
    return type(model) in EARLY_EXIT_CLASSES


def _penultimate(model: torch.nn.Module, inputs: dict, full_forward: bool) -> torch.Tensor:
    """hidden_states[-2] of one forward: stopped there (the project's classes), or taken from all hidden states."""
    if stops_early(model) and not full_forward:
        return model(**inputs, output_layer=FEATURE_LAYER, return_dict=True).last_hidden_state
    return hidden_states_of(model(**inputs, output_hidden_states=True))[FEATURE_LAYER]


@torch.inference_mode()
def extract_hf(
    model: torch.nn.Module, sample: Sample, *, temporal_context: int | None = TEMPORAL_CONTEXT,
    full_forward: bool = False, path: str = "context",
) -> torch.Tensor:
    """Penultimate features (N, D) float32 of the non-packing model for one sample, called the `path` way
    (`hf_inputs`)."""
    inputs = hf_inputs(sample, model_dtype(model), temporal_context=temporal_context, path=path)
    return _penultimate(model, inputs, full_forward)[0].float()


@torch.inference_mode()
def extract_hf_batch(model: torch.nn.Module, samples: list[Sample], *, temporal_context: int | None = TEMPORAL_CONTEXT,
                     full_forward: bool = False) -> list[torch.Tensor]:
    """Penultimate features (N, D) float32 of the non-packing model for each of several same-size samples run as
    one batch (`batched_hf_inputs`), in their order."""
    inputs = batched_hf_inputs(samples, model_dtype(model), temporal_context=temporal_context)
    return [row.float() for row in _penultimate(model, inputs, full_forward)]


@torch.inference_mode()
def extract_packing(model: torch.nn.Module, samples: list[Sample], *, full_forward: bool = False,
                    positions: str = "explicit") -> list[torch.Tensor]:
    """Penultimate features of the packing model for several samples packed into one forward pass, the positions
    given the `positions` way (`packing_inputs`)."""
    if not samples:
        return []
    inputs = packing_inputs(samples, model.config.patch_size, model_dtype(model), positions=positions)
    features = _penultimate(model, inputs, full_forward)
    total = inputs["hidden_states"].shape[0]
    if features.shape[0] != total:
        raise RuntimeError(f"packing model returned {features.shape[0]} feature tokens for {total} input patches")
    return [part.float() for part in features.split([s.num_tokens for s in samples])]
