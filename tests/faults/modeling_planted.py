"""Checkpoint code that plants one fault, or one benign change, in the project's encoders.

This file is copied verbatim into a variant's checkpoint folder and named by `auto_map` in its config.json;
the config field `planted_variant` says what to plant. The suite runs it only with `--trust-remote-code`.
The weights keep their names and shapes, so the checkpoint still loads strictly.

It imports only torch, transformers and vitparity: the copy in the checkpoint folder must work on its own.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn

from vitparity.models import OneVisionEncoderModel, OneVisionEncoderPackingModel
from vitparity.models.layers import EncoderLayer, EncoderMLP, VisionRotary3D, patch_grid_positions, rotate_pairs
from vitparity.models.modeling_onevision_encoder_packing import OneVisionEncoderPackingAttention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPORAL_CONTEXT = 64
SKIPPED_LAYER = 1  # the layer that `layer_missing` never runs (its weights still load)
# The module whose globals the packing attention calls (apply_rope, packed_attention).
PACKING_ATTENTION_MODULE = sys.modules[OneVisionEncoderPackingAttention.__module__]


def rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """The other common RoPE convention: (a, b) halves -> (-b, a). Not the release's pairing."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in float32 with the half-split rotation instead of neighbouring pairs."""
    xf = x.float()
    return (xf * cos + rotate_halves(xf) * sin).to(x.dtype)


def rope_in_input_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The release's RoPE with cos / sin cast to x's dtype, so every product is rounded to it."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_pairs(x) * sin


def attention_in_float32(original):
    """`packed_attention` on float32 copies of q, k, v, its output cast back to their dtype."""

    def upcast(q, k, v, *args, **kwargs):
        return original(q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)

    return upcast


def attention_across_samples(original):
    """`packed_attention` that treats the whole pack as one sample (no block-diagonal mask)."""

    def joint(q, k, v, segments, *args, **kwargs):
        return original(q, k, v, type(segments).from_lengths([q.shape[0]], q.device), *args, **kwargs)

    return joint


@contextmanager
def swapped_globals(module, replacements: dict):
    """Replace module globals for the duration of one forward pass; fail if a replacement never ran.

    A replacement that is never called means the library no longer calls that name: the variant would then
    test nothing, so this raises instead of letting a benign run pass or a fault go unplanted.
    """
    calls = dict.fromkeys(replacements, 0)

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    originals = {}
    for name, make in replacements.items():
        if not hasattr(module, name):
            raise RuntimeError(f"cannot plant: {module.__name__} has no {name}")
        originals[name] = getattr(module, name)
        setattr(module, name, counted(name, make(originals[name])))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)
    missing = [name for name, count in calls.items() if not count]
    if missing:
        raise RuntimeError(f"planted replacement of {module.__name__}.{'/'.join(missing)} was never called")


# Replacements of the packing attention module's globals, active only inside the planted model's forward.
GLOBAL_PLANTS = {
    "rope_half_split": {"apply_rope": lambda original: rope_half_split},
    "cross_sample_attention": {"packed_attention": attention_across_samples},
    "rope_input_dtype": {"apply_rope": lambda original: rope_in_input_dtype},
    "attention_fp32": {"packed_attention": attention_in_float32},
}


class AxesSwappedRotary(VisionRotary3D):
    """RoPE that reads (t, h, w) positions as (t, w, h)."""

    def forward(self, positions: torch.Tensor):
        return super().forward(positions[..., [0, 2, 1]])


class AxisBufferRotary(VisionRotary3D):
    """RoPE whose inverse frequencies live in non-persistent buffers `inv_freq_t/h/w`, as the release keeps them,
    with the t axis's frequencies repeated in the h axis's buffer (every value is some axis's frequency)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__(head_dim, theta)
        inv_t, inv_h, inv_w = super().inv_freqs()
        wrong_h = inv_t.repeat(-(-inv_h.numel() // inv_t.numel()))[:inv_h.numel()]
        for axis, table in zip("thw", (inv_t, wrong_h, inv_w)):
            self.register_buffer(f"inv_freq_{axis}", table, persistent=False)

    def inv_freqs(self, device=None):
        return tuple(getattr(self, f"inv_freq_{axis}").float().to(device) for axis in "thw")


class SkippedEncoderLayer(EncoderLayer):
    """A layer whose weights load but which is never applied."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _scale_2pct(model: nn.Module) -> None:
    for layer in model.encoder.layers:
        if not hasattr(layer.self_attn, "scale"):
            raise RuntimeError("cannot plant: the attention module has no `scale` attribute")
        layer.self_attn.scale = 1.02 * layer.self_attn.head_dim ** -0.5


def _axis_buffers(model: nn.Module) -> None:
    model.rotary = AxisBufferRotary(model.rotary.head_dim, model.rotary.theta)


def _wrong_scale(model: nn.Module) -> None:
    for layer in model.encoder.layers:
        if not hasattr(layer.self_attn, "scale"):
            raise RuntimeError("cannot plant: the attention module has no `scale` attribute")
        layer.self_attn.scale = 1.0 / layer.self_attn.head_dim  # head_dim**-1 instead of head_dim**-0.5


def _swap_axes(model: nn.Module) -> None:
    model.rotary.__class__ = AxesSwappedRotary


def _skip_layer(model: nn.Module) -> None:
    model.encoder.layers[SKIPPED_LAYER].__class__ = SkippedEncoderLayer


def _gelu_tanh(model: nn.Module) -> None:
    mlps = [module for module in model.modules() if isinstance(module, EncoderMLP)]
    if not mlps or not all(isinstance(getattr(mlp, "act", None), nn.Module) for mlp in mlps):
        raise RuntimeError("cannot plant: no EncoderMLP with an `act` module")
    for mlp in mlps:
        mlp.act = nn.GELU(approximate="tanh")


def _norm_eps(model: nn.Module) -> None:
    norms = [module for module in model.modules() if isinstance(module, (nn.LayerNorm, nn.RMSNorm))]
    if not norms:
        raise RuntimeError("cannot plant: no LayerNorm or RMSNorm")
    for norm in norms:
        norm.eps = 1e-5


# Changes to modules, made when the model is built (before its weights load); valid on both sides.
MODULE_PLANTS = {
    "rope_axes_swapped": _swap_axes,
    "attention_scale": _wrong_scale,
    "attention_scale_2pct": _scale_2pct,
    "rope_buffer_wrong_axis": _axis_buffers,
    "layer_missing": _skip_layer,
    "layer_removed": _skip_layer,
    "gelu_tanh": _gelu_tanh,
    "layer_norm_eps_1e-5": _norm_eps,
}
# Changes to the inputs or outputs of forward, made by the model classes below.
PACKING_IO_PLANTS = (
    "positions_ignored", "temporal_off_by_one", "channels_last", "hidden_states_shifted", "neighbour_leak_1e-6",
    "features_doubled", "loaded_bias_one_element",
)
NEIGHBOUR_LEAK = 1e-6
HF_IO_PLANTS = (
    "clip_mean_std_swapped", "hidden_states_shifted", "positions_hw_swapped", "positions_temporal_dropped",
    "sparse_positions_sorted", "mosaic_column_major", "sparse_gather_after_prenorm",
)


def _grid_positions_of(indices: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, K) indices into a (t, h, w) token grid -> (B, K, 3) (t, h, w) rows."""
    _, h, w = grid
    return torch.stack([indices // (h * w), indices % (h * w) // w, indices % w], dim=-1)


def _read_column_major(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, T, H, W) frames whose patches, read row-major, come in the column-major order of the given ones."""
    b, c, t, height, width = pixel_values.shape
    p = patch_size
    h, w = height // p, width // p
    grid = pixel_values.reshape(b, c, t, h, p, w, p).permute(0, 1, 2, 5, 3, 4, 6)  # (b, c, t, w, h, p, p)
    grid = grid.reshape(b, c, t, h, w, p, p).permute(0, 1, 2, 3, 5, 4, 6)  # the column-major run laid row-major
    return grid.reshape(b, c, t, height, width)


def _gather_after_norm(model: nn.Module):
    """(embeddings, layernorm_pre) forwards that embed and norm every patch and then gather the visible ones."""
    embed, norm = model.embeddings.forward, model.layernorm_pre.forward

    def embed_norm_gather(pixel_values, token_indices):
        x = norm(embed(pixel_values, None))
        if token_indices is None:
            return x
        return x[torch.arange(x.shape[0], device=x.device)[:, None], token_indices]

    return embed_norm_gather, lambda x: x


def _plant(model: nn.Module, known: tuple[str, ...]) -> str:
    name = getattr(model.config, "planted_variant", None)
    if name in MODULE_PLANTS:
        MODULE_PLANTS[name](model)
    elif name not in known:
        raise ValueError(f"unknown planted variant {name!r} for {type(model).__name__}")
    return name


def _shift_hidden_states(outputs):
    """hidden_states one layer late: entry i holds what entry i+1 should, the final (post-norm) output last."""
    if outputs.hidden_states is not None:
        outputs.hidden_states = tuple(outputs.hidden_states[1:]) + (outputs.last_hidden_state,)
    return outputs


def _remove_skipped_layer(outputs):
    """hidden_states without the skipped layer's entry, as if the model had one layer fewer."""
    if outputs.hidden_states is not None:
        hidden = outputs.hidden_states
        outputs.hidden_states = tuple(hidden[:SKIPPED_LAYER + 1]) + tuple(hidden[SKIPPED_LAYER + 2:])
    return outputs


def _leak_neighbours(outputs, lengths: list[int]):
    """Add NEIGHBOUR_LEAK x the mean of the other samples' tokens to every token of each sample."""

    def leak(x: torch.Tensor) -> torch.Tensor:
        if len(lengths) < 2:
            return x
        parts = x.split(lengths)
        total = x.sum(dim=0)
        leaked = [part + NEIGHBOUR_LEAK * (total - part.sum(dim=0)) / (x.shape[0] - part.shape[0]) for part in parts]
        return torch.cat(leaked)

    outputs.last_hidden_state = leak(outputs.last_hidden_state)
    if outputs.hidden_states is not None:
        outputs.hidden_states = tuple(leak(h) for h in outputs.hidden_states)
    return outputs


def _off_by_one_frame_positions(positions: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
    """Video frame positions interpolated over `context` frames instead of `context - 1`: round(i/(T-1)*64)."""
    positions = positions.clone()
    start = 0
    for t, h, w in grid:
        if t > 1:
            frame = torch.arange(t, device=positions.device).repeat_interleave(h * w)
            positions[start:start + t * h * w, 0] = torch.round(frame * TEMPORAL_CONTEXT / (t - 1)).to(positions.dtype)
        start += t * h * w
    return positions


def _finish(outputs, return_dict, config):
    return outputs if (return_dict if return_dict is not None else config.return_dict) else outputs.to_tuple()


class PlantedPackingModel(OneVisionEncoderPackingModel):
    """The packing encoder with `config.planted_variant` planted."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.planted_variant = _plant(self, PACKING_IO_PLANTS + tuple(GLOBAL_PLANTS))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The loaded model; `loaded_bias_one_element` then changes one loaded value (a loader bug)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.planted_variant == "loaded_bias_one_element":
            with torch.no_grad():
                model.layernorm_post.bias[0] += 0.5
        return loaded

    def forward(self, hidden_states, grid_thw, patch_positions=None, output_hidden_states=None, return_dict=None):
        variant = self.planted_variant
        grid = torch.as_tensor(grid_thw).tolist()
        if variant == "positions_ignored":
            patch_positions = None  # RoPE from the grid: video frames at 0..T-1, not at their 64-frame positions
        elif variant == "temporal_off_by_one":
            if patch_positions is None:
                patch_positions = torch.cat([patch_grid_positions(t, h, w, hidden_states.device) for t, h, w in grid])
            patch_positions = _off_by_one_frame_positions(torch.as_tensor(patch_positions), grid)
        elif variant == "channels_last":
            c, p = self.config.num_channels, self.config.patch_size
            hidden_states = hidden_states.reshape(-1, p, p, c).permute(0, 3, 1, 2).reshape(-1, c * p * p)
        with swapped_globals(PACKING_ATTENTION_MODULE, GLOBAL_PLANTS.get(variant, {})):
            outputs = super().forward(hidden_states, grid_thw, patch_positions, output_hidden_states, return_dict=True)
        if variant == "hidden_states_shifted":
            outputs = _shift_hidden_states(outputs)
        elif variant == "layer_removed":
            outputs = _remove_skipped_layer(outputs)
        elif variant == "neighbour_leak_1e-6":
            outputs = _leak_neighbours(outputs, [t * h * w for t, h, w in grid])
        elif variant == "features_doubled":
            outputs.last_hidden_state = 2 * outputs.last_hidden_state
            if outputs.hidden_states is not None:
                outputs.hidden_states = tuple(2 * h for h in outputs.hidden_states)
        return _finish(outputs, return_dict, self.config)


class PlantedHFModel(OneVisionEncoderModel):
    """The non-packing encoder with `config.planted_variant` planted."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.planted_variant = _plant(self, HF_IO_PLANTS)

    def forward(self, pixel_values, visible_indices=None, patch_positions=None, output_hidden_states=None,
                return_dict=None):
        if self.planted_variant == "clip_mean_std_swapped":
            shape = (1, -1) + (1,) * (pixel_values.dim() - 2)
            mean = torch.tensor(CLIP_MEAN, device=pixel_values.device).view(shape)
            std = torch.tensor(CLIP_STD, device=pixel_values.device).view(shape)
            raw = pixel_values.float() * std + mean  # undo the correct normalisation ...
            pixel_values = ((raw - std) / mean).to(pixel_values.dtype)  # ... and redo it with mean and std swapped
        variant = self.planted_variant
        if patch_positions is not None and variant in ("positions_hw_swapped", "positions_temporal_dropped"):
            patch_positions = torch.as_tensor(patch_positions).clone()
            if variant == "positions_hw_swapped":
                patch_positions = patch_positions[..., [0, 2, 1]]
            else:
                patch_positions[..., 0] = 0
        if patch_positions is not None and variant == "mosaic_column_major":
            pixel_values = _read_column_major(pixel_values, self.config.patch_size)
        if visible_indices is not None and patch_positions is None and variant == "sparse_positions_sorted":
            p = self.config.patch_size
            grid = (pixel_values.shape[2], pixel_values.shape[3] // p, pixel_values.shape[4] // p)
            patch_positions = _grid_positions_of(torch.as_tensor(visible_indices).sort(dim=-1).values, grid)
        if variant == "sparse_gather_after_prenorm":
            self.embeddings.forward, self.layernorm_pre.forward = _gather_after_norm(self)
        try:
            outputs = super().forward(pixel_values, visible_indices, patch_positions, output_hidden_states,
                                      return_dict=True)
        finally:
            if variant == "sparse_gather_after_prenorm":
                del self.embeddings.forward, self.layernorm_pre.forward
        if self.planted_variant == "hidden_states_shifted":
            outputs = _shift_hidden_states(outputs)
        return _finish(outputs, return_dict, self.config)
