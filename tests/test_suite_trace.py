"""The suite's diagnosis and coverage options end to end (pytester, built-in pair, CPU): the per-layer trace of a
failing test, --scales and the companion swap of each pack group."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import pytest

from conftest import verdicts
from faults import build_variant
from vitparity.builtin import BUILTIN_MEDIA
from vitparity.media import load_media
from vitparity.suite.cases import collect_cases, make_groups
from vitparity.suite.settings import DEFAULT_PACK_TOKENS
from vitparity.trace import LAYER_COUNT, SHIFTED

def bundled_cases(**kwargs) -> tuple:
    """The bundled media's cases as the suite plans them by default (each image and video, each video's codec-style
    case), and their pack groups at the CPU's budget."""
    cases = collect_cases([BUILTIN_MEDIA], patch_size=14, align="crop", num_frames=8, codec_frames=8, **kwargs)
    return cases, make_groups(cases, DEFAULT_PACK_TOKENS["cpu"])


FIRST = re.compile(r"^first divergence: layer (\d+)\b", re.M)


def reports(result, name: str) -> list:
    """The call-phase reports of the tests whose function is `name`."""
    return [r for r in result.reprec.getreports("pytest_runtest_logreport")
            if r.when == "call" and r.nodeid.split("::")[-1].startswith(name + "[")]


def run_variant(suite, name: str, tmp_path: Path, *args: str):
    folder = build_variant(name, tmp_path / "checkpoints")
    return suite.run(f"--packing-model={folder}", "--trust-remote-code", "--report-dir=report", *args)


@pytest.mark.parametrize("name, first, pattern, words", [
    ("channels_last", 0, None, "layer 0 (the embedding output)"),
    ("attention_scale", 1, None, "layer 1, attention (q, k, v equal; the output before the projection differs): "
                                 "softmax scale 1/head_dim instead of head_dim**-0.5 (packing)"),
    ("hidden_states_shifted", 0, SHIFTED, f"layer 0 (the embedding output): {SHIFTED}"),
    ("layer_removed", 2, LAYER_COUNT, f"layer 2: {LAYER_COUNT}"),
])
def test_failing_parity_names_the_first_divergence(name, first, pattern, words, suite, isolated, tmp_path) -> None:
    result = run_variant(suite, name, tmp_path, "-k", "test_parity and coffee_small")
    result.assert_outcomes(failed=1)
    (report,) = reports(result, "test_parity")
    text = report.longreprtext
    assert FIRST.findall(text) == [str(first)], text
    assert (pattern is None) == ("pattern:" not in text) and (pattern is None or f"pattern: {pattern}" in text), text
    properties = dict(report.user_properties)
    assert properties["trace[image-coffee_small.jpg] first_divergence"] == str(first)
    assert f"\nfirst divergence: {words}\n" in text and properties["trace[image-coffee_small.jpg] divergence"] == words
    plot = suite.path / "report" / "image-coffee_small.jpg-layers.png"
    assert f"layer plot: {plot}" in text and properties["layer_trace_plot"] == str(plot)
    assert cv2.imread(str(plot)) is not None
    assert (suite.path / "report" / "image-coffee_small.jpg-heatmap.png").exists()  # the heat map, next to it
    assert "layer traces 1;" in result.stdout.str()


def test_packed_failure_traces_each_failing_case_inside_its_pack(suite, isolated, tmp_path) -> None:
    """cross_sample_attention passes every case run alone; its packs fail, and the trace in the pack names the
    first layer (attention); the companion swap catches it too."""
    result = run_variant(suite, "cross_sample_attention", tmp_path, "-k", "test_packed or test_companions")
    outcomes = result.parseoutcomes()
    cases, groups = bundled_cases()
    assert outcomes["failed"] == 2 * len(groups) and "passed" not in outcomes  # each group: test_packed, companions
    traced_cases = 0
    for report in reports(result, "test_packed"):
        group = report.nodeid.split("[")[-1].rstrip("]")
        traced = {key.split("]")[0].removeprefix("trace["): value for key, value in report.user_properties
                  if key.startswith("trace[") and key.endswith("first_divergence")}
        failing = re.findall(r"^\s*\[\d+\] packed/(\S+)$", report.longreprtext, re.M)  # every case fails here
        assert f"Summary: {len(failing)} inputs, 0 passed" in report.longreprtext
        assert failing and traced == dict.fromkeys(failing, "1"), report.longreprtext
        assert FIRST.findall(report.longreprtext) == ["1"] * len(failing)
        assert report.longreprtext.count("first divergence: layer 1, attention (q, k, v equal; the output before the "
                                         "projection differs): packing's is not") == len(failing)
        traced_cases += len(failing)
        assert cv2.imread(str(suite.path / "report" / f"{group}-layers.png")) is not None
    for report in reports(result, "test_companions_do_not_leak"):
        assert "FAIL: features changed by up to" in report.longreprtext
    # every case of the packs traced once: each image, each video, each video's codec-style case
    assert traced_cases == len(cases) and f"layer traces {len(cases)};" in result.stdout.str()


def test_passing_run_traces_nothing(suite) -> None:
    result = suite.run("-m", "not golden")
    assert result.ret == 0
    assert "layer traces 0;" in result.stdout.str()
    assert not (suite.path / "parity-report").exists()


def test_companion_swap_catches_a_leak_below_every_threshold(suite, isolated, tmp_path) -> None:
    """neighbour_leak_1e-6 passes parity, the packed comparisons and the goldens; only the swap fails."""
    result = run_variant(suite, "neighbour_leak_1e-6", tmp_path)
    failed = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed]
    assert failed and {r.nodeid.split("::")[-1].split("[")[0] for r in failed} == {"test_companions_do_not_leak"}
    for report in failed:
        assert "FAIL: features changed by up to" in report.longreprtext
        assert "no" in {value for key, value in report.user_properties if key.endswith(" identical")}
    assert set(verdicts(result.stdout.str()).values()) == {"PASS"}
    # two swaps per pack (even positions kept, then odd): 2 packed forwards for each pack group
    _, groups = bundled_cases()
    assert f"companion swaps {2 * len(groups)};" in result.stdout.str()


@pytest.mark.parametrize("args, message", [
    (["--scales=1,0"], "--scales=1,0: '0': scale must be in (0, 1]"),
    (["--scales=0.5,1,0.5"], "--scales=0.5,1,0.5: '0.5' is listed twice"),
    (["--scales=2"], "--scales=2: '2': scale must be in (0, 1]"),
])
def test_bad_choices_are_usage_errors(args, message, suite) -> None:
    result = suite.run(*args, "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_scales_add_readable_cases_that_pass(suite) -> None:
    before = suite.goldens()
    result = suite.run("--scales=1,0.5", "-m", "not golden")
    assert result.ret == 0
    found = verdicts(result.stdout.str())
    # each file at both scales and each video's codec-style case (native size only), their packed rows, 2
    # explicit-positions rows per video and codec case, 3 token-order rows, last_hidden_state and pooler_output of
    # every case (test_outputs), each case's batched row (test_batch), the grid_thw-only call's rows (images, videos)
    cases, _ = bundled_cases(scales=(1.0, 0.5))
    n = len(cases)
    moving = sum(case.kind != "image" for case in cases)
    gridded = sum(case.kind in ("image", "video") for case in cases)
    rows = n + n + 2 * moving + 3 + 2 * n + n + gridded
    assert f"{rows} comparisons, {rows} passed, 0 failed" in result.stdout.str()
    assert set(found.values()) == {"PASS"}
    assert {"image-astronaut.jpg", "image-astronaut.jpg@0.5", "video-coffee_zoom.mp4@0.5",
            "packed/video-coffee_zoom.mp4@0.5"} <= set(found)
    assert "scales: 1,0.5" in result.stdout.str()
    # goldens of a scaled case are files of their own; the committed ones stay as they are and still pass (an
    # update deletes the unused goldens of the selection: run it with every scale whose goldens are kept)
    written = suite.run("--scales=1,0.5", "-k", "coffee_small", "-m", "golden", "--snapshot-update")
    assert written.ret == 0
    new = set(suite.goldens()) - set(before)
    assert sorted(Path(name).name for name in new) == [
        "test_golden[image-coffee_small.jpg@0.5-hf].npz", "test_golden[image-coffee_small.jpg@0.5-packing].npz"]
    assert {name: data for name, data in suite.goldens().items() if name in before} == before
    again = suite.run("--scales=0.5", "-k", "coffee_small", "-m", "golden")
    again.assert_outcomes(passed=2)


def test_scaled_token_estimates_match_the_decoded_media() -> None:
    """Pack groups are planned from the estimates: at every scale they equal the patches the case decodes to."""
    cases = collect_cases([BUILTIN_MEDIA], patch_size=14, align="crop", num_frames=8, scales=(1.0, 0.5, 0.3))
    assert len(cases) == 3 * len({case.path for case in cases})
    for case in cases:
        # the frames the case samples: --num-frames, or the @<N>f of its file name (coffee_tilt@4f.mp4)
        media = load_media(case.path, num_frames=case.frames, patch_size=14, scale=case.scale)
        t = media.frames.shape[0] if media.frames.ndim == 4 else 1
        h, w = media.frames.shape[-3] // 14, media.frames.shape[-2] // 14
        assert case.tokens == t * h * w, case.id


