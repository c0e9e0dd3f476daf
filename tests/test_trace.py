"""The per-layer trace names the hidden state where each planted fault (tests/faults) first diverges.

The planted models are built from their classes in tests/faults/modeling_planted.py (the same code a variant's
checkpoint folder runs by remote code); one test loads a variant through trust_remote_code as the suite does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import cv2
import pytest
import torch
import transformers.dynamic_module_utils

from faults import FAULT, VARIANTS, VARIANTS_BY_NAME, build_variant, load_variant_models, names_step
from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.compare import DEFAULT_THRESHOLD
from vitparity.extract import TEMPORAL_CONTEXT, prepare_sample
from vitparity.loading import load_model
from vitparity.media import load_media
from vitparity.precision import Bars
from vitparity.report import write_layer_trace_plot
from vitparity.trace import LAYER_COUNT, SHIFTED, TEMPORAL, LayerTrace, trace_layers

IMAGE = BUILTIN_MEDIA / "coffee_small.jpg"  # 5x7 patches
VIDEO = BUILTIN_MEDIA / "coffee_zoom.mp4"  # 4 sampled frames of 8x12 patches
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# variant -> (first divergence, patterns) on a video; images agree where the fault touches only video.
EXPECTED = {
    "channels_last": (0, []),
    "clip_mean_std_swapped": (0, []),
    "hidden_states_shifted": (0, [SHIFTED]),
    "rope_half_split": (1, []),
    "rope_axes_swapped": (1, []),
    "attention_scale": (1, []),
    "qk_swapped": (1, []),
    "positions_ignored": (1, [TEMPORAL]),
    "temporal_off_by_one": (1, [TEMPORAL]),
    "layer_missing": (2, [LAYER_COUNT]),
    "layer_removed": (2, [LAYER_COUNT]),
    "cross_sample_attention": (None, []),  # invisible to a sample run alone; see test_trace_in_a_pack
    "neighbour_leak_1e-6": (None, []),  # the same; 1e-6 is below any threshold even in a pack
    "rope_buffer_wrong_axis": (1, []),
    # below the threshold at every layer: located by the float32 bars (BAR_FIRST_DIVERGENCE)
    "attention_scale_2pct": (None, []),
    "feature_mlp_bias_dropped": (None, []),
    "weights_bf16_rounded": (None, []),
    "features_doubled": (None, []),
    # not on the features' path: only test_loaded_weights sees them
    "norm_gain_zeroed": (None, []),
    "loaded_bias_one_element": (None, []),
    # the explicit-position paths only (select=PATH_CASES, test_input_paths): the trace's samples take the default
    # path (no patch_positions, visible_indices in frame order), where these code paths never run
    "positions_hw_swapped": (None, []),
    "positions_temporal_dropped": (None, []),
    "sparse_positions_sorted": (None, []),
    "mosaic_column_major": (None, []),
}
# float32, with the float32 precision bars: the hidden state where a fault below the threshold first shows.
BAR_FIRST_DIVERGENCE = {
    "attention_scale_2pct": 1,
    "feature_mlp_bias_dropped": 3,  # hidden_states[3], the output of the layer whose bias was dropped
    "weights_bf16_rounded": 1,
    "features_doubled": 0,  # every hidden state doubled: the magnitude bar
}
VIDEO_ONLY = ("positions_ignored", "temporal_off_by_one")
FIRST_LINE = re.compile(r"^first divergence: layer (\d+)\b", re.M)


def _sample(path: Path, dtype: torch.dtype, name: str):
    return prepare_sample(load_media(path, num_frames=4), patch_size=14, dtype=dtype, name=name)


def _variant_models(name: str, dtype: torch.dtype, root: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    return load_variant_models(name, root, dtype)


def _trace(hf, packing, sample, **kwargs) -> LayerTrace:
    return trace_layers(hf, packing, sample, temporal_context=TEMPORAL_CONTEXT, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", EXPECTED)
def test_trace_names_the_first_divergence(name: str, dtype: str, tmp_path: Path) -> None:
    hf, packing = _variant_models(name, DTYPES[dtype], tmp_path)
    first, patterns = EXPECTED[name]
    video = _trace(hf, packing, _sample(VIDEO, DTYPES[dtype], "video"))
    assert (video.first_divergence, video.pattern_names) == (first, patterns), video.format()
    text = video.format()
    if first is None:
        assert not FIRST_LINE.search(text) and "first divergence: none" in text
    else:
        assert FIRST_LINE.findall(text) == [str(first)], text
        assert (video.dtype, video.device) == (dtype, "cpu")
        assert names_step(video.divergence(), VARIANTS_BY_NAME[name].step), text  # what broke, not only where
        assert f"first divergence: {video.divergence()}" in text
    image = _trace(hf, packing, _sample(IMAGE, DTYPES[dtype], "image"))
    if name in VIDEO_ONLY or first is None:
        assert image.first_divergence is None and not image.patterns, image.format()
    else:
        assert image.first_divergence == first and TEMPORAL not in image.pattern_names, image.format()
        assert names_step(image.divergence(), VARIANTS_BY_NAME[name].step), image.format()


@pytest.mark.parametrize("name", BAR_FIRST_DIVERGENCE)
def test_float32_bars_locate_faults_below_the_threshold(name: str, tmp_path: Path) -> None:
    hf, packing = _variant_models(name, torch.float32, tmp_path)
    sample = _sample(IMAGE, torch.float32, "image")
    assert _trace(hf, packing, sample).first_divergence is None  # the threshold alone sees nothing
    trace = _trace(hf, packing, sample, bars=Bars.for_dtype("float32"))
    assert trace.first_divergence == BAR_FIRST_DIVERGENCE[name], trace.format()
    assert names_step(trace.divergence(), VARIANTS_BY_NAME[name].step), trace.format()


def test_every_fault_has_an_expected_trace() -> None:
    assert set(EXPECTED) == {v.name for v in VARIANTS if v.kind == FAULT}
    # every step a fault names is asserted: alone, by the float32 bars, or in a pack (cross_sample_attention)
    asserted = {name for name, (first, _) in EXPECTED.items() if first is not None} | set(BAR_FIRST_DIVERGENCE)
    assert {v.name for v in VARIANTS if v.step != "none"} == asserted | {"cross_sample_attention"}
    assert all(v.step == "none" for v in VARIANTS if v.kind != FAULT)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [v.name for v in VARIANTS if v.kind != FAULT] + [None])
def test_trace_finds_no_divergence_without_a_fault(name: str | None, dtype: str, tmp_path: Path) -> None:
    if name is None:
        hf, packing = (load_model(path, dtype=DTYPES[dtype]).model for path in (BUILTIN_HF, BUILTIN_PACKING))
    else:
        hf, packing = _variant_models(name, DTYPES[dtype], tmp_path)
    trace = _trace(hf, packing, _sample(VIDEO, DTYPES[dtype], "video"), bars=Bars.for_dtype(dtype))
    assert trace.first_divergence is None and not trace.patterns, trace.format()  # threshold and the dtype's bars
    assert trace.diagnosis is None and trace.divergence() == "none"
    assert len(trace.rows) == trace.hf_count == trace.packing_count == 5
    assert all(row.min_cos > DEFAULT_THRESHOLD for row in trace.rows)


def test_trace_in_a_pack_finds_cross_sample_attention(tmp_path: Path) -> None:
    """Run alone the sample agrees; traced inside its pack, the first layer (attention) diverges."""
    hf, packing = _variant_models("cross_sample_attention", torch.float32, tmp_path)
    video, image = _sample(VIDEO, torch.float32, "video"), _sample(IMAGE, torch.float32, "image")
    assert _trace(hf, packing, video, pack=[video]).first_divergence is None
    trace = _trace(hf, packing, video, pack=[image, video])
    assert (trace.first_divergence, trace.pattern_names) == (1, []), trace.format()
    assert names_step(trace.divergence(), VARIANTS_BY_NAME["cross_sample_attention"].step), trace.format()
    assert "first divergence: layer 1, attention (q, k, v equal; the output before the projection differs): " \
        "packing's is not the attention of its own q, k, v" in trace.format()
    assert trace.rows[0].max_abs == 0.0  # the embedding is per token: no neighbour reaches it
    clean = load_model(BUILTIN_PACKING).model
    assert _trace(hf, clean, video, pack=[image, video]).first_divergence is None


def test_trace_refuses_a_pack_without_the_sample() -> None:
    hf, packing = (load_model(path).model for path in (BUILTIN_HF, BUILTIN_PACKING))
    video, image = _sample(VIDEO, torch.float32, "video"), _sample(IMAGE, torch.float32, "image")
    with pytest.raises(ValueError, match="video: the pack must hold the traced sample exactly once, found it 0"):
        _trace(hf, packing, video, pack=[image])


def test_layer_count_still_compares_the_common_prefix(tmp_path: Path) -> None:
    hf, packing = _variant_models("layer_removed", torch.float32, tmp_path)
    trace = _trace(hf, packing, _sample(IMAGE, torch.float32, "image"))
    assert (trace.hf_count, trace.packing_count, len(trace.rows)) == (5, 4, 4)
    assert [row.passed for row in trace.rows] == [True, True, False, False]
    assert "hf returns 5 hidden states (4 layers), packing 4 (3 layers)" in trace.patterns[0].detail
    assert "only hf returns layers 4..4" in trace.format()


def test_trace_of_a_remote_code_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant loaded by trust_remote_code, as the suite loads it (checkpoint code copied to a tmp cache)."""
    cache = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules = [m for m in sys.modules if m == "transformers_modules" or m.startswith("transformers_modules.")]
    for module in modules:
        monkeypatch.delitem(sys.modules, module)
    folder = build_variant("hidden_states_shifted", tmp_path / "checkpoints")
    loaded = load_model(folder, dtype=torch.bfloat16, trust_remote_code=True)
    assert loaded.source == "remote code"
    hf = load_model(BUILTIN_HF, dtype=torch.bfloat16).model
    trace = _trace(hf, loaded.model, _sample(IMAGE, torch.bfloat16, "image"))
    assert trace.pattern_names == [SHIFTED] and "packing hidden_states[i] matches hf hidden_states[i+1]" in trace.format()
    for module in [m for m in sys.modules if m.startswith("transformers_modules.")]:
        del sys.modules[module]


def test_trace_records_round_trip(tmp_path: Path) -> None:
    hf, packing = _variant_models("layer_missing", torch.float32, tmp_path)
    trace = _trace(hf, packing, _sample(IMAGE, torch.float32, "image1"))
    data = json.loads(json.dumps(trace.to_json()))
    assert LayerTrace.from_json(data) == trace
    assert data["first_divergence"] == 2 and data["patterns"][0]["name"] == LAYER_COUNT
    properties = dict(trace.properties())
    assert properties["trace[image1] first_divergence"] == "2"
    assert properties["trace[image1] divergence"] == f"layer 2: {LAYER_COUNT}" == trace.divergence()
    assert properties["trace[image1] patterns"] == LAYER_COUNT
    assert properties["trace[image1] min_cos"].split(",")[:2] == ["1.000000", "1.000000"]
    assert len(properties["trace[image1] min_cos"].split(",")) == 5
    assert "packing hidden_states[2] equals hidden_states[1]: its layer 2 (encoder.layers[1])" in trace.format()
    hf, packing = _variant_models("rope_axes_swapped", torch.float32, tmp_path / "rope")
    diagnosed = _trace(hf, packing, _sample(IMAGE, torch.float32, "image1"))
    assert diagnosed.diagnosis is not None
    assert LayerTrace.from_json(json.loads(json.dumps(diagnosed.to_json()))) == diagnosed
    assert dict(diagnosed.properties())["trace[image1] divergence"] == (
        "layer 1, q after RoPE (q before RoPE equal): the rotary embedding, h/w axes (packing)")


def test_layer_trace_plot(tmp_path: Path) -> None:
    hf, packing = (load_model(path).model for path in (BUILTIN_HF, BUILTIN_PACKING))
    clean = _trace(hf, packing, _sample(IMAGE, torch.float32, "clean"))
    hf_bad, packing_bad = _variant_models("attention_scale", torch.float32, tmp_path)
    broken = _trace(hf_bad, packing_bad, _sample(IMAGE, torch.float32, "attention_scale"))
    path = write_layer_trace_plot([clean, broken], tmp_path / "out" / "layers.png", title="two cases")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] == 640 and image.shape[0] > 360
    clean_bgr, broken_bgr = (255, 160, 60), (60, 200, 255)
    plot = image[:320]
    assert (plot == clean_bgr).all(axis=-1).sum() > 100 and (plot == broken_bgr).all(axis=-1).sum() > 100
    # the broken case's line drops towards the bottom of the axes, the clean one stays at the top
    rows_broken = (plot == broken_bgr).all(axis=-1).any(axis=1).nonzero()[0]
    rows_clean = (plot == clean_bgr).all(axis=-1).any(axis=1).nonzero()[0]
    assert rows_broken.max() > 150 > rows_clean.max()
    with pytest.raises(ValueError, match="no traces"):
        write_layer_trace_plot([], tmp_path / "empty.png")


def test_temporal_positions_inside_a_pack(tmp_path: Path) -> None:
    hf, packing = _variant_models("temporal_off_by_one", torch.float32, tmp_path)
    video, image = _sample(VIDEO, torch.float32, "video"), _sample(IMAGE, torch.float32, "image")
    trace = _trace(hf, packing, video, pack=[image, video])
    assert (trace.first_divergence, trace.pattern_names) == (1, [TEMPORAL]), trace.format()
