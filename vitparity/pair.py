"""The model pair: every rule that two checkpoints must follow before their features are compared, in one place.

Rules, each with one message (PairError):
- threshold: a minimum cosine strictly between 0 and 1 (`vitparity.rules`, light: checked before torch loads);
- frames: at least one frame per video, and no more than the hf model's temporal RoPE context (`vitparity.rules`);
- normalisation: both checkpoints' preprocessor_config.json (or the CLIP defaults) normalise alike;
- sides: the hf model is a non-packing model and the packing model a packing one;
- config: the two configs agree on every field that defines the weights (`checks.WEIGHT_FIELDS`); other
  differences (`checks.NUMERIC_FIELDS`) are warnings, or errors with `strict_config`;
- weights: every loaded tensor equal to the checkpoint's, element by element; no NaN / Inf, no all-zero matrix or
  norm gain, RoPE tables that are the formula of their own axis (`checks.loaded_model_problems`);
  non-persistent buffers as a fresh construction gives them (`vitparity.buffers`, applied when each model loads:
  restored and named, or refused with `strict_buffers`);
- temporal context: the hf config's `rope_temporal_size` when config.json has the field, the release's 64 otherwise
  (`temporal_context`): the same value for the frames rule, extraction, metadata.json and golden folder names.

`preflight_pair` applies the rules that need only the config files (cheap: run it before decoding media);
`PairFiles.load` / `load_pair` load both models and apply the rest.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from .checkpoint_code import CodeRecord, choose_code
from .checks import loaded_model_problems, split_config_differences
from .extract import CLIP_NORMALIZATION, TEMPORAL_CONTEXT, Normalization
from .hub import ModelRef, resolve_model
from .loading import DTYPES, LoadedModel, ModelLoadError, load_model, read_config
from .models import MODEL_TYPES, OneVisionEncoderConfig
from .numerics import tf32_setting
from .rules import SIDES, PairError, check_num_frames

PREPROCESSOR_FILE = "preprocessor_config.json"


class SideLoadError(ModelLoadError):
    """One side's checkpoint could not be loaded; `side` ("hf" or "packing") says which."""

    def __init__(self, side: str, message: str) -> None:
        super().__init__(message)
        self.side = side


def check_side(ref: ModelRef, side: str, actual: str, what: str) -> None:
    """The sides rule: the hf model is a non-packing model and the packing model a packing one.

    `actual` is the side the checkpoint's model is (`loading.LoadedModel.side`), `what` describes it."""
    if actual != side:
        raise PairError(
            f"{ref.spec}: given as the {side} model but it is a {actual} model ({what}); the hf model must be a "
            "non-packing model and the packing model a packing one"
        )


def check_configs(hf: ModelRef, packing: ModelRef, hf_config, packing_config, *, strict: bool) -> list[str]:
    """The config rule on two config objects; returns the warnings (differences that change only numerics)."""
    errors, warnings = split_config_differences(hf_config, packing_config, strict=strict)
    if errors:
        rule = "(strict config: every difference counts)" if strict else "(fields that define the weights)"
        raise PairError(f"{hf.spec} and {packing.spec} do not describe the same model {rule}: " + "; ".join(errors))
    return warnings


def _builtin_config(config: dict) -> PretrainedConfig | None:
    """config.json as this package's config class when its model_type is one of MODEL_TYPES and it names no code of
    its own (`auto_map`); None otherwise (the rules then wait for the loaded model)."""
    if config.get("model_type") not in MODEL_TYPES or "auto_map" in config:
        return None
    return MODEL_TYPES[config["model_type"]][0].from_dict(config)


def temporal_context(hf_config: dict) -> int | None:
    """The temporal RoPE context of the non-packing model, from its config.json: `rope_temporal_size` when the
    config has the field (null: the frames given, no limit), else the release protocol's 64 frames
    (`extract.TEMPORAL_CONTEXT`; some release config classes have no such field, later ones default it to 64)."""
    return hf_config.get("rope_temporal_size", TEMPORAL_CONTEXT)


def _three_numbers(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise PairError(f"{path}: {key} must be a list of 3 numbers, got {value!r}")
    return tuple(float(v) for v in value)


def read_normalization(folder: str | Path) -> Normalization:
    """The normalisation of a checkpoint folder: image_mean, image_std and rescale_factor of its
    preprocessor_config.json (honouring do_normalize / do_rescale), the CLIP defaults when the file is absent.
    Resize and crop settings are ignored: the protocol runs at native resolution."""
    path = Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        return CLIP_NORMALIZATION
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PairError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise PairError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("do_normalize", True):
        mean = _three_numbers(data.get("image_mean", list(CLIP_NORMALIZATION.mean)), "image_mean", path)
        std = _three_numbers(data.get("image_std", list(CLIP_NORMALIZATION.std)), "image_std", path)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    rescale = data.get("rescale_factor", CLIP_NORMALIZATION.rescale) if data.get("do_rescale", True) else 1.0
    if not isinstance(rescale, (int, float)) or not math.isfinite(rescale) or rescale <= 0:
        raise PairError(f"{path}: rescale_factor must be a positive number, got {rescale!r}")
    if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
        raise PairError(f"{path}: image_mean must be finite and image_std positive, got {list(mean)} / {list(std)}")
    return Normalization(mean, std, float(rescale), str(path))


def preprocessor_config(normalization: Normalization) -> dict:
    """A CLIPImageProcessor preprocessor_config.json that normalises as `normalization`, at native resolution."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": False,
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": normalization.rescale,
        "do_normalize": True,
        "image_mean": list(normalization.mean),
        "image_std": list(normalization.std),
    }


def pair_normalization(hf: Normalization, packing: Normalization) -> Normalization:
    """The normalisation rule: both sides normalise alike; the shared values, with both sources named."""
    if not hf.same_values(packing):
        raise PairError(
            "the two checkpoints normalise their input differently: "
            f"hf mean {list(hf.mean)} std {list(hf.std)} rescale {hf.rescale} ({hf.source}) vs "
            f"packing mean {list(packing.mean)} std {list(packing.std)} rescale {packing.rescale} ({packing.source})"
        )
    source = hf.source if hf.source == packing.source else f"hf: {hf.source}; packing: {packing.source}"
    return Normalization(hf.mean, hf.std, hf.rescale, source)


@dataclass
class ModelPair:
    """Two loaded models that passed the pair rules, with what a run records about them."""

    hf: LoadedModel
    packing: LoadedModel
    normalization: Normalization
    config_warnings: list[str]
    dtype: torch.dtype
    device: str
    temporal_context: int | None  # `temporal_context(config.json)` of the hf model (None: the frames given)
    _weight_problems: dict[str, list[str]] | None = field(default=None, repr=False)

    def side(self, name: str) -> LoadedModel:
        """The loaded model of side `name` ("hf" or "packing")."""
        if name not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {name!r}")
        return self.hf if name == "hf" else self.packing

    @property
    def patch_size(self) -> int:
        return int(self.hf.model.config.patch_size)

    def weight_problems(self) -> dict[str, list[str]]:
        """Side -> problems of its loaded parameters and buffers (`checks.loaded_model_problems`), found once."""
        if self._weight_problems is None:
            self._weight_problems = {side: loaded_model_problems(self.side(side).model, self.side(side).path)
                                     for side in SIDES}
        return self._weight_problems

    def provenance(self) -> dict[str, Any]:
        """What a features folder or golden records about the pair: origins (repo ids and resolved commits),
        classes, the non-persistent buffers restored after loading (side -> names), normalisation, config warnings,
        temporal context, dtype, device and the TF32 setting."""
        models = {}
        for side in SIDES:
            loaded = self.side(side)
            models[side] = {**loaded.ref.provenance(), "class_name": loaded.class_name, "source": loaded.source,
                            "code": loaded.code.to_dict() if loaded.code is not None else None}
        return {
            "models": models,
            "restored_buffers": {side: list(self.side(side).restored_buffers) for side in SIDES},
            "temporal_context": self.temporal_context,
            "normalization": self.normalization.to_dict(),
            "config_warnings": list(self.config_warnings),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "tf32": tf32_setting(self.device, self.dtype),
        }


@dataclass
class PairFiles:
    """Two resolved checkpoint folders whose config files passed the rules that need no weights."""

    hf: ModelRef
    packing: ModelRef
    hf_config: dict
    packing_config: dict
    normalization: Normalization
    # side -> the code that will run it (`checkpoint_code.choose_code`), None when the code rule was not applied
    code: dict[str, CodeRecord] | None = None
    trust_remote_code: bool = False
    own_classes: bool = False

    @property
    def patch_size(self) -> int:
        return int(self.hf_config.get("patch_size", OneVisionEncoderConfig().patch_size))

    @property
    def temporal_context(self) -> int | None:
        return temporal_context(self.hf_config)

    def load(
        self,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool | None = None,
        own_classes: bool | None = None,
        strict_config: bool = False,
        strict_buffers: bool = False,
        check_weights: bool = True,
        on_load: Callable[[str, ModelRef], None] | None = None,
    ) -> ModelPair:
        """Load both models (the code choice of `preflight_pair` unless `trust_remote_code` / `own_classes` are given) (in eval mode) and apply the sides, config and (with `check_weights`) weights rules;
        `strict_buffers` refuses a model whose non-persistent buffers loading left wrong instead of restoring them.

        `on_load(side, ref)` is called just before each side's model is loaded (progress lines, load counts).
        """
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        trust_remote_code = self.trust_remote_code if trust_remote_code is None else trust_remote_code
        own_classes = self.own_classes if own_classes is None else own_classes
        loaded: dict[str, LoadedModel] = {}
        for side, ref in (("hf", self.hf), ("packing", self.packing)):
            if on_load is not None:
                on_load(side, ref)
            try:
                loaded[side] = load_model(ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                          own_classes=own_classes, strict_buffers=strict_buffers)
            except PairError:
                raise
            except ModelLoadError as err:
                raise SideLoadError(side, str(err)) from err
            check_side(ref, side, loaded[side].side, loaded[side].describe())
        hf, packing = loaded["hf"], loaded["packing"]
        warnings = check_configs(self.hf, self.packing, hf.model.config, packing.model.config, strict=strict_config)
        if hf.model.config.patch_size != self.patch_size:
            raise PairError(
                f"{self.hf.spec}: the loaded model has patch_size {hf.model.config.patch_size}, config.json "
                f"says {self.patch_size}"
            )
        pair = ModelPair(hf, packing, self.normalization, warnings, dtype, device, self.temporal_context)
        if check_weights:
            for side, problems in pair.weight_problems().items():
                if problems:
                    raise PairError(f"{pair.side(side).path}: unusable weights after loading: " + "; ".join(problems))
        return pair


def preflight_pair(
    hf: str | os.PathLike[str], packing: str | os.PathLike[str], *, num_frames: int | None = None,
    num_frames_name: str = "num_frames", strict_config: bool = False, trust_remote_code: bool = False,
    own_classes: bool = False,
) -> PairFiles:
    """Resolve both checkpoints (local folders or hub ids), read their config files and apply the rules that need
    no weights: the code rule (`checkpoint_code.choose_code`: a checkpoint with code of its own runs it with
    `trust_remote_code`, is checked with vitparity's classes with `own_classes`, and is refused with neither; its
    code is imported here, so code that cannot be imported is one error naming the file and class), frames (when
    `num_frames` is given) and normalisation; for checkpoints of this package's model types, also the sides and
    config rules (checkpoints with code of their own are checked once loaded)."""
    refs = {side: resolve_model(spec) for side, spec in (("hf", hf), ("packing", packing))}
    configs = {side: read_config(ref.path) for side, ref in refs.items()}
    code = {side: choose_code(refs[side], side, configs[side], trust_remote_code=trust_remote_code,
                              own_classes=own_classes, known_types=MODEL_TYPES) for side in SIDES}
    builtin = {side: _builtin_config(config) for side, config in configs.items()}
    for side, config in builtin.items():
        if config is not None:
            check_side(refs[side], side, MODEL_TYPES[config.model_type][2], f"model_type {config.model_type!r}")
    if builtin["hf"] is not None and builtin["packing"] is not None:
        check_configs(refs["hf"], refs["packing"], builtin["hf"], builtin["packing"], strict=strict_config)
    if num_frames is not None:
        check_num_frames(num_frames, temporal_context(configs["hf"]), refs["hf"].spec, num_frames_name)
    normalization = pair_normalization(read_normalization(refs["hf"].path), read_normalization(refs["packing"].path))
    return PairFiles(refs["hf"], refs["packing"], configs["hf"], configs["packing"], normalization, code,
                     trust_remote_code, own_classes)


def load_pair(
    hf: str | os.PathLike[str],
    packing: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    num_frames: int | None = None,
    trust_remote_code: bool = False,
    own_classes: bool = False,
    strict_config: bool = False,
    strict_buffers: bool = False,
    check_weights: bool = True,
    on_load: Callable[[str, ModelRef], None] | None = None,
) -> ModelPair:
    """`preflight_pair` then `PairFiles.load`: both models loaded, every pair rule applied (PairError otherwise)."""
    return preflight_pair(hf, packing, num_frames=num_frames, strict_config=strict_config,
                          trust_remote_code=trust_remote_code, own_classes=own_classes).load(
        dtype=dtype, device=device, strict_config=strict_config,
        strict_buffers=strict_buffers, check_weights=check_weights, on_load=on_load,
    )
