"""The model-pair rules (vitparity.pair), the config field split and the pinned float32 numerics."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING
from vitparity.checks import NUMERIC_FIELDS, WEIGHT_FIELDS, split_config_differences
from vitparity.extract import CLIP_NORMALIZATION, Normalization, normalize
from vitparity.loading import ModelLoadError
from vitparity.models import ARCHITECTURE_FIELDS, OneVisionEncoderConfig, OneVisionEncoderPackingConfig
from vitparity.numerics import pinned_float32, tf32_setting
from vitparity.pair import (
    PairError, check_num_frames, load_pair, pair_normalization, preflight_pair, read_normalization,
)
from vitparity.rules import check_threshold

from conftest import edited_checkpoint


def test_pair_error_is_a_model_load_error() -> None:
    assert issubclass(PairError, ModelLoadError)


@pytest.mark.parametrize("value", [-1.0, 0.0, 1.0, 1.5, math.nan])
def test_threshold_rule(value: float) -> None:
    with pytest.raises(PairError, match=r"--threshold=.*: must be in \(0, 1\)"):
        check_threshold(value, "--threshold")
    assert check_threshold(0.99) == 0.99


def test_frames_rule() -> None:
    with pytest.raises(PairError, match="num_frames=0: must be >= 1"):
        check_num_frames(0, 64, "m")
    with pytest.raises(PairError, match=r"num_frames=65 does not fit the temporal context of m \(rope_temporal_size=64\)"):
        check_num_frames(65, 64, "m")
    assert check_num_frames(64, 64, "m") == 64 and check_num_frames(500, None, "m") == 500


def test_preflight_checks_frames_before_loading(tmp_path: Path) -> None:
    hf = edited_checkpoint(BUILTIN_HF, tmp_path / "hf", rope_temporal_size=16)
    with pytest.raises(PairError, match="rope_temporal_size=16"):
        preflight_pair(hf, BUILTIN_PACKING, num_frames=17)
    assert preflight_pair(hf, BUILTIN_PACKING, num_frames=16).temporal_context == 16


def test_config_field_split() -> None:
    """Every architecture field is classified once; hidden_act and layer_norm_eps only change numerics."""
    assert set(WEIGHT_FIELDS).isdisjoint(NUMERIC_FIELDS)
    assert set(ARCHITECTURE_FIELDS) <= set(WEIGHT_FIELDS) | set(NUMERIC_FIELDS)
    assert {"hidden_act", "layer_norm_eps"} <= set(NUMERIC_FIELDS)
    hf = OneVisionEncoderConfig(hidden_size=64, num_attention_heads=2)
    packing = OneVisionEncoderPackingConfig(hidden_size=64, num_attention_heads=2, hidden_act="gelu_pytorch_tanh",
                                            layer_norm_eps=1e-5)
    errors, warnings = split_config_differences(hf, packing)
    assert errors == [] and [line.split(":")[0] for line in warnings] == ["hidden_act", "layer_norm_eps"]
    assert split_config_differences(hf, packing, strict=True) == (warnings, [])
    packing.rope_theta = 500.0
    assert split_config_differences(hf, packing)[0] == ["rope_theta: hf 10000.0 vs packing 500.0"]


def test_numeric_differences_pass_with_warnings_and_fail_when_strict(tmp_path: Path) -> None:
    packing = edited_checkpoint(BUILTIN_PACKING, tmp_path / "packing", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5)
    pair = load_pair(BUILTIN_HF, packing)
    assert len(pair.config_warnings) == 2 and pair.provenance()["config_warnings"] == pair.config_warnings
    assert pair.packing.model.config.hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(PairError, match="strict config: every difference counts.*hidden_act.*layer_norm_eps"):
        load_pair(BUILTIN_HF, packing, strict_config=True)


def test_weight_field_difference_is_an_error(tmp_path: Path) -> None:
    packing = edited_checkpoint(BUILTIN_PACKING, tmp_path / "packing", rope_theta=500.0)
    with pytest.raises(PairError, match="do not describe the same model .*rope_theta") as error:
        load_pair(BUILTIN_HF, packing)
    assert "hidden_act" not in str(error.value)


def test_sides_rule_and_load_order() -> None:
    seen = []
    with pytest.raises(PairError, match="given as the hf model but it is a packing model"):
        load_pair(BUILTIN_PACKING, BUILTIN_HF, on_load=lambda side, ref: seen.append((side, ref.spec)))
    assert seen == []  # known from config.json: nothing is loaded
    files = preflight_pair(BUILTIN_HF, BUILTIN_PACKING)
    swapped = dataclasses.replace(files, hf=files.packing, packing=files.hf)  # as remote code, known once loaded
    with pytest.raises(PairError, match="given as the hf model but it is a packing model"):
        swapped.load(on_load=lambda side, ref: seen.append((side, ref.spec)))
    assert seen == [("hf", str(BUILTIN_PACKING))]
    seen.clear()
    pair = load_pair(BUILTIN_HF, BUILTIN_PACKING, on_load=lambda side, ref: seen.append(side))
    assert seen == ["hf", "packing"]
    assert pair.side("hf") is pair.hf and pair.side("packing") is pair.packing
    with pytest.raises(ValueError, match="side must be one of"):
        pair.side("other")


def test_weights_rule(tmp_path: Path) -> None:
    hf = Path(shutil.copytree(BUILTIN_HF, tmp_path / "hf"))
    state = load_file(str(hf / "model.safetensors"))
    state["head.probe"].view(-1)[0] = float("nan")
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PairError, match=r"unusable weights after loading: head\.probe: 1 of 64 values are NaN"):
        load_pair(hf, BUILTIN_PACKING)
    pair = load_pair(hf, BUILTIN_PACKING, check_weights=False)
    assert pair.weight_problems()["packing"] == [] and "head.probe" in pair.weight_problems()["hf"][0]


def test_provenance() -> None:
    provenance = load_pair(BUILTIN_HF, BUILTIN_PACKING, dtype="bfloat16").provenance()
    assert provenance["models"]["hf"]["path"] == str(BUILTIN_HF) and provenance["models"]["hf"]["commit"] is None
    assert provenance["models"]["packing"]["class_name"] == "OneVisionEncoderPackingModel"
    assert provenance["normalization"] == CLIP_NORMALIZATION.to_dict()
    assert (provenance["dtype"], provenance["device"], provenance["tf32"]) == ("bfloat16", "cpu", "n/a on cpu")


def _processor(folder: Path, **fields: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", **fields}))
    return folder


def test_read_normalization(tmp_path: Path) -> None:
    assert read_normalization(tmp_path) == CLIP_NORMALIZATION
    folder = _processor(tmp_path / "a", image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], rescale_factor=0.5,
                        size={"shortest_edge": 448}, do_center_crop=True)
    assert read_normalization(folder) == Normalization((0.5,) * 3, (0.25,) * 3, 0.5, str(folder / "preprocessor_config.json"))
    plain = read_normalization(_processor(tmp_path / "b", do_normalize=False, do_rescale=False))
    assert (plain.mean, plain.std, plain.rescale) == ((0.0,) * 3, (1.0,) * 3, 1.0)
    defaults = read_normalization(_processor(tmp_path / "c"))  # a processor without the keys: CLIP values
    assert defaults.same_values(CLIP_NORMALIZATION) and defaults.source.endswith("preprocessor_config.json")
    for name, bad in (("d", {"image_std": [0.5, 0.0, 0.5]}), ("e", {"image_mean": [0.5]}), ("f", {"rescale_factor": -1})):
        with pytest.raises(PairError, match=str(tmp_path / name)):
            read_normalization(_processor(tmp_path / name, **bad))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "preprocessor_config.json").write_text("{")
    with pytest.raises(PairError, match="not valid JSON"):
        read_normalization(tmp_path / "g")


def test_normalization_rule() -> None:
    other = Normalization((0.5,) * 3, (0.5,) * 3, 1 / 255, "/x/preprocessor_config.json")
    with pytest.raises(PairError, match=r"hf mean \[0\.48145466.*\(CLIP defaults\) vs packing mean \[0\.5, 0\.5, 0\.5\]"):
        pair_normalization(CLIP_NORMALIZATION, other)
    same = Normalization(CLIP_NORMALIZATION.mean, CLIP_NORMALIZATION.std, 1 / 255, "/y/preprocessor_config.json")
    assert pair_normalization(same, CLIP_NORMALIZATION).source == "hf: /y/preprocessor_config.json; packing: CLIP defaults"


def test_normalize_takes_the_normalization() -> None:
    frames = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3) * 2
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()
    clip = (x / 255.0 - torch.tensor(CLIP_NORMALIZATION.mean).view(3, 1, 1, 1)) / torch.tensor(
        CLIP_NORMALIZATION.std).view(3, 1, 1, 1)
    assert torch.equal(normalize(frames, dtype=torch.float32, device="cpu"), clip)  # bit-identical to RGB / 255
    half = Normalization((0.5,) * 3, (0.5,) * 3, 1 / 255, "test")
    assert torch.equal(normalize(frames, dtype=torch.float32, device="cpu", normalization=half), (x / 255.0 - 0.5) / 0.5)


@pytest.fixture
def tf32_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_pinned_float32_turns_tf32_off_and_restores(tf32_flags) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with pinned_float32("cuda:0", torch.float32) as setting:
        assert setting is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError), pinned_float32("cuda", torch.float32):
        raise RuntimeError("a failed run restores the flags too")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    for device, dtype, expected in (("cpu", torch.float32, "n/a on cpu"), ("cuda", torch.bfloat16, "n/a for bfloat16")):
        with pinned_float32(device, dtype) as setting:
            assert setting == expected == tf32_setting(device, dtype)
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
