"""The precision bars (vitparity.precision) beside the threshold, their options, and the loaded-weights check made
exact (vitparity.checks.loaded_model_problems)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from vitparity.builtin import BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.checks import loaded_model_problems, rope_axis_tables
from vitparity.compare import compare_features, comparison_from_row
from vitparity.loading import load_model
from vitparity.precision import DEFAULT_COS_GAP, DEFAULT_NORM_GAP, Bars, parse_bar
from vitparity.report import format_report, format_table

FLOAT32 = Bars.for_dtype("float32")


def _features(n: int = 64, d: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("text, value", [("auto", "auto"), (" OFF ", "off"), ("2e-6", 2e-6), ("0.5", 0.5)])
def test_parse_bar_accepts(text, value) -> None:
    assert parse_bar(text, "--max-cos-gap") == value


@pytest.mark.parametrize("text", ["0", "-1e-6", "nan", "inf", "tight", ""])
def test_parse_bar_refuses_naming_the_option(text) -> None:
    with pytest.raises(ValueError, match=re.escape(f"--max_norm_gap={text}: ")):
        parse_bar(text, "--max_norm_gap")


def test_bars_per_dtype() -> None:
    assert (FLOAT32.cos_gap, FLOAT32.norm_gap) == (DEFAULT_COS_GAP["float32"], DEFAULT_NORM_GAP["float32"])
    bf16 = Bars.for_dtype("bfloat16", "off", 0.3)
    assert (bf16.cos_gap, bf16.norm_gap, bf16.dtype) == (None, 0.3, "bfloat16")
    assert bf16.describe() == "bfloat16 bars: mean 1-cos bar off, norm gap <= 0.3"
    with pytest.raises(ValueError, match="int8"):
        Bars.for_dtype("int8")


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_bars_fail_what_the_threshold_passes(as_tensor) -> None:
    """Doubled features (cosine 1) fail the magnitude bar; a small direction change (min cos 0.9999) fails the
    direction bar; float32-sized noise passes both. The same verdicts on host arrays and on tensors."""
    a = _features()
    rng = np.random.default_rng(1)
    noise = a + 1e-6 * rng.standard_normal(a.shape).astype(np.float32)
    moved = a + 1e-2 * rng.standard_normal(a.shape).astype(np.float32)
    convert = torch.from_numpy if as_tensor else np.asarray
    doubled = compare_features(convert(a), convert(2 * a), bars=FLOAT32)
    assert doubled.min_cos > 0.99 and not doubled.passed
    assert doubled.reason == "norm gap 1.000e+00 > 0.002 (float32 magnitude bar)"
    assert doubled.norm_gap == pytest.approx(1.0)
    direction = compare_features(convert(a), convert(moved), bars=FLOAT32)
    assert direction.min_cos > 0.999 and not direction.passed and "(float32 direction bar)" in direction.reason
    assert "magnitude bar" not in direction.reason
    assert compare_features(convert(a), convert(noise), bars=FLOAT32).passed
    assert compare_features(convert(a), convert(2 * a)).passed  # without bars: the seed's rule alone
    assert compare_features(convert(a), convert(2 * a), bars=Bars.for_dtype("float32", "auto", "off")).passed


def test_zero_token_against_a_non_zero_one_fails_the_magnitude_bar() -> None:
    a = _features(4, 8)
    b = a.copy()
    a[2] = 0
    c = compare_features(a, b, threshold=-0.5, bars=FLOAT32)
    assert c.norm_gap == float("inf") and "magnitude bar" in c.reason


def test_rows_reports_and_tables_show_both_bars_with_margins() -> None:
    a = _features()
    c = compare_features(a, 2 * a, name="doubled", bars=FLOAT32)
    row = c.row()
    assert (row["cos_gap_bar"], row["norm_gap_bar"], row["bar_dtype"]) == (FLOAT32.cos_gap, FLOAT32.norm_gap, "float32")
    again = comparison_from_row(json.loads(json.dumps(row)))
    assert (again.bars, again.norm_gap, again.passed) == (FLOAT32, c.norm_gap, False)
    text = format_report([again])
    assert "float32 bars: mean 1-cos" in text and "norm gap 1.000e+00 (500 of the bar 0.002)" in text
    assert "FAIL: norm gap 1.000e+00 > 0.002 (float32 magnitude bar)" in text
    table = format_table([again])
    assert "mean 1-cos (of bar)" in table and "1.000e+00 (500)" in table
    new_keys = ("norm_gap", "cos_gap_bar", "norm_gap_bar", "bar_dtype")
    old = {key: value for key, value in row.items() if key not in new_keys}
    assert comparison_from_row(old).bars is None  # rows written before the bars existed still read


def test_loaded_weights_check_is_exact(tmp_path) -> None:
    """One element of a 1-D tensor off by one float32 ulp, a zeroed norm gain, a RoPE table of the wrong axis:
    each is named; the built-in model as loaded is clean."""
    loaded = load_model(BUILTIN_PACKING)
    model = loaded.model
    assert loaded_model_problems(model, loaded.path) == []
    with torch.no_grad():
        bias = model.encoder.layers[1].mlp.fc2.bias
        bias[5] = torch.nextafter(bias[5], torch.tensor(1.0))
    problems = loaded_model_problems(model, loaded.path)
    assert len(problems) == 1 and problems[0].startswith("encoder.layers.1.mlp.fc2.bias: 1 of 64 values differ")
    with torch.no_grad():
        model.layernorm_pre.weight.zero_()
    assert any("layernorm_pre.weight: norm gain all zeros" in p for p in loaded_model_problems(model))
    tables = rope_axis_tables(model.config)
    wrong = tables["t"].repeat(2)[: tables["h"].numel()]  # every value a RoPE frequency, of the wrong axis
    model.rotary.register_buffer("inv_freq_h", wrong, persistent=False)
    model.rotary.register_buffer("inv_freq_w", tables["w"].clone(), persistent=False)
    problems = loaded_model_problems(model)
    assert [p.split(":")[0] for p in problems if "inv_freq" in p] == ["rotary.inv_freq_h"]
    assert "of axis h (n 6)" in problems[-1]


def test_bfloat16_run_probes_one_case_in_float32(suite) -> None:
    """A bfloat16 run: every row carries the bfloat16 bars, the smallest case carries the float32 probe's row, the
    summary names both bars and the probe's cost, and JUnit gets the rows."""
    result = suite.run("--dtype=bfloat16", "-k", "test_parity", "--junitxml=run.xml")
    assert result.ret == 0, result.stdout.str()[-3000:]
    out = result.stdout.str()
    assert "precision bfloat16 bars: mean 1-cos <= 0.02, norm gap <= 0.1  float32 probe: the run's smallest case, " \
           "judged by float32 bars: mean 1-cos <= 3.5e-06, norm gap <= 0.002" in out
    assert re.search(r"float32 probe: 2 loads, 2 forwards \(70 tokens\), \d\.\d\dx the one-pass minimum counting it",
                     out)
    assert "fp32 probe/image-coffee_small..." in out
    rows = [json.loads(prop.get("value")) for prop in ET.parse(suite.path / "run.xml").iter("property")
            if prop.get("name") == "vitparity"]
    # one row per case that test_parity ran (each image and video, and each video's codec-style case) and the probe's
    cases = {row["name"] for row in rows if row["bar_dtype"] == "bfloat16"}
    files = [p for p in BUILTIN_MEDIA.iterdir() if p.suffix in (".jpg", ".png", ".mp4")]
    every = len(files) + len([p for p in files if p.suffix == ".mp4"])  # each file, and each video's codec-style case
    assert len(cases) == result.parseoutcomes()["passed"] == every and any(name.startswith("codec-") for name in cases)
    assert len(rows) == len(cases) + 1 and {row["bar_dtype"] for row in rows} == {"bfloat16", "float32"}
    (probe,) = [row for row in rows if row["bar_dtype"] == "float32"]
    assert probe["name"] == "fp32 probe/image-coffee_small.jpg" and probe["passed"]
    assert {row["norm_gap_bar"] for row in rows if row["bar_dtype"] == "bfloat16"} == {0.1}


def test_noise_measurement_separates_faults_from_numerics(capsys) -> None:
    """`python -m bench.precision_noise` (docs/detection.md's figures, there on the ViT-L config) on the small
    config: every fault moves the features more than every numerics-only variant, by the bar it is meant for."""
    from bench.precision_noise import main as measure

    assert measure(["--config", "small", "--height", "56", "--width", "70", "--dtypes", "float32"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 7 and cells[1] in ("benign", "fault"):
            rows[cells[0]] = (cells[1], float(cells[3]), float(cells[4]))
    assert len(rows) == 7
    benign = [figures for kind, *figures in rows.values() if kind == "benign"]
    worst_direction, worst_norm = max(f[0] for f in benign), max(f[1] for f in benign)
    assert worst_direction < FLOAT32.cos_gap and worst_norm < FLOAT32.norm_gap
    for name in ("attention_scale_2pct", "feature_mlp_bias_dropped", "weights_bf16_rounded"):
        assert rows[name][1] > 10 * worst_direction, name
    assert rows["features_doubled"][2] > FLOAT32.norm_gap
