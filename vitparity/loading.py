"""Loading a checkpoint folder by path into the right class, strictly."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from .choices import DTYPE_NAMES
from .checkpoint_code import CHECKPOINT_CODE, CodeRecord, choose_code
from .buffers import check_buffers, non_persistent_buffers, restore_buffers
from .hub import ModelLoadError, ModelRef, read_config, resolve_model
from .models import MODEL_TYPES
from .models.layers import VisionRotary3D

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# Module holding the release's RoPE inverse-frequency buffers, per side. The release keeps them non-persistent;
# checkpoints saved from copies patched to make them persistent carry `<module>.inv_freq_{t,h,w}`.
ROPE_BUFFER_MODULES = {"hf": "video_rope", "packing": "rotary_emb"}
ROPE_AXES = ("t", "h", "w")
ROPE_BUFFER_RTOL = 1e-6


@dataclass
class LoadedModel:
    """A model in eval mode and where it came from."""

    model: torch.nn.Module
    path: str
    side: str  # "hf" (pixel_values) or "packing" (flat patches + grid_thw)
    class_name: str
    source: str  # "vitparity" or "remote code"
    ref: ModelRef  # the spec given and, for hub ids, the repo and resolved commit
    # Non-persistent buffers that loading left different from a fresh construction, restored from it (`buffers`)
    restored_buffers: list[str] = field(default_factory=list)
    code: CodeRecord | None = None  # the code that ran it, with its files' digests (`checkpoint_code`)

    def describe(self) -> str:
        return f"{self.class_name} ({self.source}, {self.side}) from {self.path}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the features, recorded with every features folder and golden."""
    import cv2
    import numpy
    import transformers

    from . import __version__

    return {"vitparity": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "cv2": cv2.__version__}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded through model.safetensors.index.json or not).

    A folder holding both model.safetensors and the index is ambiguous (ModelLoadError): each names other weights.
    """
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file() and single.is_file():
        raise ModelLoadError(f"{folder}: ambiguous weights, both {single.name} and {index.name}; remove the stale one")
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the folder's safetensors files, read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise ModelLoadError(f"{folder}: weights file {path.name} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises several types for truncated or corrupt files
            raise ModelLoadError(f"{path}: cannot read safetensors weights ({err})") from err
    return shapes


def weight_problems(shapes: dict[str, tuple[int, ...]], model: torch.nn.Module) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of a checkpoint against a model; empty when exact."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {shapes[k]} vs model {expected[k]}" for k in set(expected) & set(shapes) if shapes[k] != expected[k]
    )
    named = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    return [f"{label} {items}" for label, items in named if items]


def rope_buffer_keys(side: str) -> tuple[str, ...]:
    """The checkpoint keys of the release's RoPE buffers on one side: `video_rope.inv_freq_t`, ..."""
    return tuple(f"{ROPE_BUFFER_MODULES[side]}.inv_freq_{axis}" for axis in ROPE_AXES)


def saved_tensors(folder: Path, keys) -> dict[str, torch.Tensor]:
    """The tensors named `keys` that the folder's safetensors files hold (keys they do not hold are left out)."""
    saved = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            saved.update({key: handle.get_tensor(key) for key in keys if key in handle.keys()})
    return saved


def saved_rope_buffer_problems(folder: Path, keys: list[str], config) -> list[str]:
    """Saved RoPE buffers (`keys`, from `rope_buffer_keys`) that are not the formula 1 / theta ** (j / n) of
    their axis, computed in float32, within relative ROPE_BUFFER_RTOL; one line per key naming the largest
    difference. Empty when every saved buffer is the formula."""
    rope = VisionRotary3D(config.hidden_size // config.num_attention_heads, config.rope_theta)
    expected = dict(zip(ROPE_AXES, rope.inv_freqs()))
    saved = saved_tensors(folder, keys)
    problems = []
    for key in keys:
        want = expected[key.rsplit("_", 1)[1]]
        got = saved[key]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key}: shape {tuple(got.shape)}, the formula gives {tuple(want.shape)}")
            continue
        got = got.float()
        difference = (got - want).abs()
        if not torch.isfinite(got).all() or bool((difference > ROPE_BUFFER_RTOL * want.abs()).any()):
            worst = int(torch.nan_to_num(difference, nan=float("inf")).argmax())
            problems.append(
                f"{key}: not the RoPE inverse frequencies 1/theta**(j/n) (theta {config.rope_theta}, n {want.numel()}, "
                f"relative tolerance {ROPE_BUFFER_RTOL:g}): largest difference {float(difference[worst]):.3e} at "
                f"j={worst} ({float(got[worst])!r} vs {float(want[worst])!r}, saved as {saved[key].dtype})"
            )
    return problems


def _side_of(model_type: str | None, model: torch.nn.Module) -> str:
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type][2]
    return "packing" if "packing" in (model_type or "") or hasattr(model, "patch_embed") else "hf"


def load_model(
    path: str | Path | ModelRef,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    own_classes: bool = False,
    strict_buffers: bool = False,
) -> LoadedModel:
    """Load a checkpoint folder or hub id (`org/name[@revision]`, see `vitparity.hub`), or a reference already
    resolved (`resolve_model`): the checkpoint's own code (`auto_map`) with `trust_remote_code`, the project's class
    chosen by `model_type` otherwise; a checkpoint with code of its own needs one of `trust_remote_code` and
    `own_classes` (`checkpoint_code.choose_code`: never a silent substitution).

    Missing, unexpected or mismatched weights are errors, except the release's RoPE buffers
    (`rope_buffer_keys`) when they hold the RoPE formula: they are checked, then left out.

    Every non-persistent buffer is then compared with a fresh construction of the class (`buffers.check_buffers`):
    one the checkpoint carries with another value is an error naming the module, the buffer and the largest
    difference; one that loading left different (transformers 5 leaves buffers the checkpoint does not carry
    uninitialised) is restored from the fresh construction and named in `restored_buffers`, or, with
    `strict_buffers`, an error. ModelLoadError names the folder and the cause.
    """
    ref = path if isinstance(path, ModelRef) else resolve_model(path)
    folder = ref.path
    config = read_config(folder)
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin) in the model folder")
    model_type = config.get("model_type")
    rope_keys: list[str] = []
    code = choose_code(ref, MODEL_TYPES[model_type][2] if model_type in MODEL_TYPES else None, config,
                       trust_remote_code=trust_remote_code, own_classes=own_classes, known_types=MODEL_TYPES)
    if code.source == CHECKPOINT_CODE:
        loader, source = code.model_class, "remote code"
        kwargs = {"trust_remote_code": True}
    else:
        config_cls, loader, _ = MODEL_TYPES[model_type]
        source, kwargs = "vitparity", {}
        if weight_files(folder):
            model_config = config_cls.from_dict({k: v for k, v in config.items() if k != "auto_map"})
            with torch.device("meta"):
                skeleton = loader(model_config)
            shapes = checkpoint_shapes(folder)
            rope_keys = [key for key in rope_buffer_keys(MODEL_TYPES[model_type][2]) if key in shapes]
            rope_problems = saved_rope_buffer_problems(folder, rope_keys, model_config)
            if rope_problems:
                raise ModelLoadError(f"{folder}: saved RoPE buffers refused: " + "; ".join(rope_problems))
            problems = weight_problems({k: v for k, v in shapes.items() if k not in rope_keys}, skeleton)
            if problems:
                raise ModelLoadError(f"{folder}: weights do not match {loader.__name__}: " + "; ".join(problems))
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    # transformers' load report would list checked buffers as unexpected; every missing, unexpected or mismatched
    # key is reported below as an error instead.
    hf_logging.set_verbosity_error()
    try:
        model, info = loader.from_pretrained(str(folder), dtype=dtype, output_loading_info=True, **kwargs)
    except Exception as err:  # transformers and safetensors raise many types for unreadable checkpoints
        raise ModelLoadError(f"{folder}: cannot load the checkpoint ({type(err).__name__}: {err})") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    carried = saved_tensors(folder, non_persistent_buffers(model))
    checked = set(rope_keys) | set(carried)
    info["unexpected_keys"] = [key for key in info.get("unexpected_keys") or () if key not in checked]
    problems = [f"{name} {sorted(info[name])}" for name in ("missing_keys", "unexpected_keys") if info.get(name)]
    if info.get("mismatched_keys"):
        problems.append(f"mismatched_keys {sorted(str(k) for k in info['mismatched_keys'])}")
    if info.get("error_msgs"):
        problems.append(f"errors {info['error_msgs']}")
    if problems:
        raise ModelLoadError(f"{folder}: weights do not match the model: " + "; ".join(problems))
    restored = _checked_buffers(folder, model, carried, dtype, strict_buffers)
    model = model.to(device).eval()
    return LoadedModel(model, str(folder), _side_of(model_type, model), type(model).__name__, source, ref, restored,
                       code)


def _checked_buffers(folder: Path, model: torch.nn.Module, carried: dict[str, torch.Tensor], dtype: torch.dtype,
                     strict: bool) -> list[str]:
    """`buffers.check_buffers` applied: the names of the buffers restored (sorted); ModelLoadError for a carried
    buffer with a wrong value, or for one to restore under `strict`."""
    try:
        findings = check_buffers(model, carried, dtype)
    except Exception as err:  # the class's own constructor, run again on the CPU (remote code may raise anything)
        raise ModelLoadError(
            f"{folder}: cannot build {type(model).__name__} again on the CPU to check its non-persistent buffers "
            f"({type(err).__name__}: {err})"
        ) from err
    if findings.saved_wrong:
        raise ModelLoadError(f"{folder}: saved buffers refused: " + "; ".join(findings.saved_wrong))
    if findings.restore and strict:
        raise ModelLoadError(
            f"{folder}: non-persistent buffers differ from a fresh construction of {type(model).__name__} after "
            "loading (strict buffers: refused instead of restored): "
            + "; ".join(f"{name}: {text}" for name, text in sorted(findings.differences.items()))
        )
    restore_buffers(model, findings.restore)
    return sorted(findings.restore)
