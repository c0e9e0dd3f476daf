"""Goldens across machines and releases: updates keep what they cannot replace, a failing golden says how its
provenance differs, drift against a previous release's goldens, and goldens a reviewer can read."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA
from vitparity.cli import main
from vitparity.loading import weight_files
from vitparity.provenance_diff import provenance_diff
from vitparity.snapshots import golden_file_stem, other_model_folders_hint
from vitparity.suite.golden_state import MISSING, NEW_WEIGHTS, GoldenTally, missing_why
from vitparity.suite.golden_upkeep import case_of_file, golden_key

from conftest import REPO, golden_files
from faults import build_variant

HF_F32 = "onevision_encoder-41bbf9a8a5e4-float32-8of64-crop"
PACKING_F32 = "onevision_encoder_packing-0a8da2050499-float32-8of64-crop"


def rewrite_golden(path: Path, *, versions: dict | None = None, flip_tokens: int = 0, meta: dict | None = None) -> None:
    """Edit a golden in place: recorded library versions, other meta fields, the sign of its first tokens."""
    with np.load(path) as archive:
        arrays = dict(archive)
    record = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    # goldens record OpenCV's version as `cv2` (older ones as `opencv`): rewrite the key this golden records
    own = {"opencv": "cv2"} if "cv2" in record["versions"] else {}
    record["versions"] = {**record["versions"], **{own.get(k, k): v for k, v in (versions or {}).items()}}
    record.update(meta or {})
    arrays["meta"] = np.frombuffer(json.dumps(record, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    arrays["projection"][:flip_tokens] = -arrays["projection"][:flip_tokens]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


# -- updates never delete what they cannot replace


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Goldens of the built-in cases plus one extra image (good.jpg) and one H.264 video (clip.mp4), written by an
    update in a process of its own; the media folder is <returned>/M, the goldens <returned>/G."""
    root = tmp_path_factory.mktemp("written")
    (root / "M").mkdir()
    shutil.copy(BUILTIN_MEDIA / "coffee_small.jpg", root / "M" / "good.jpg")
    shutil.copy(BUILTIN_MEDIA / "chelsea_pan.mp4", root / "M" / "clip.mp4")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "VITPARITY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--device=cpu", "parity_tests/test_golden.py",
         "--snapshot-update", f"--golden-dir={root / 'G'}", f"--media={root / 'M'}", f"--report-dir={root / 'report'}"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    files = [p for p in (*BUILTIN_MEDIA.iterdir(), *(root / "M").iterdir()) if p.suffix in (".jpg", ".png", ".mp4")]
    cases = len(files) + len([p for p in files if p.suffix == ".mp4"])  # each file, each video's codec-style case
    assert len(golden_files(root / "G")) == 2 * cases  # two models each
    return root


def clip_and_good(files: dict[str, bytes], name: str) -> dict[str, bytes]:
    return {path: data for path, data in files.items() if f"[{name}-" in path}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "n2"])
@pytest.mark.parametrize("flag", ["--snapshot-update", "--regenerate-goldens"])
def test_update_keeps_goldens_of_an_erroring_case_and_deletes_only_removed_media(suite, written, tmp_path, flag,
                                                                                  workers, monkeypatch) -> None:
    monkeypatch.setattr("vitparity.suite.media_preflight.check_run_media", lambda *args: None)  # the file breaks after it
    media, goldens = Path(shutil.copytree(written / "M", tmp_path / "M")), tmp_path / "G"
    shutil.copytree(written / "G", goldens)
    before = golden_files(goldens)
    (media / "clip.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))  # a half-synced file
    (media / "good.jpg").rename(media / "renamed.jpg")  # a removed media file
    result = suite.run("parity_tests/test_golden.py", flag, f"--golden-dir={goldens}", f"--media={media}", *workers)
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    after = golden_files(goldens)
    clip = clip_and_good(before, "video-clip.mp4")
    assert len(clip) == 2 and clip_and_good(after, "video-clip.mp4") == clip  # kept, byte for byte
    assert not clip_and_good(after, "image-good.jpg") and len(clip_and_good(after, "image-renamed.jpg")) == 2
    deleted = re.findall(r"^deleted (\S+): (.*)$", out, re.M)
    assert sorted(Path(path).name for path, _ in deleted) == [
        "test_golden[image-good.jpg-hf].npz", "test_golden[image-good.jpg-packing].npz"]
    assert all(reason == "no media file of this collection gives its case" for _, reason in deleted)
    kept = re.findall(r"^kept (\S+): (.*)$", out, re.M)
    assert sorted(Path(path).name for path, _ in kept) == [
        "test_golden[codec-clip.mp4-hf].npz", "test_golden[codec-clip.mp4-packing].npz",
        "test_golden[video-clip.mp4-hf].npz", "test_golden[video-clip.mp4-packing].npz"]
    assert all(reason.startswith(("errored: video-clip.mp4: ", "errored: codec-clip.mp4: ")) and "clip.mp4" in reason
               for _, reason in kept)
    assert re.search(r"update incomplete: 2 case\(s\) errored, their goldens were kept, not replaced: "
                     r"(video-clip.mp4, codec-clip.mp4|codec-clip.mp4, video-clip.mp4)", out)
    assert "unused snapshots deleted" not in out and "unused snapshot deleted" not in out


@pytest.mark.parametrize("narrowing, why", [(["-k", "coffee_small"], "-k 'coffee_small'"), (["--shard=1/2", "--pack-tokens=2000"], "--shard")])
def test_a_narrowed_update_deletes_nothing_and_says_why(suite, written, tmp_path, narrowing, why) -> None:
    media, goldens = Path(shutil.copytree(written / "M", tmp_path / "M")), tmp_path / "G"
    shutil.copytree(written / "G", goldens)
    (media / "good.jpg").rename(media / "renamed.jpg")
    before = golden_files(goldens)
    result = suite.run("parity_tests/test_golden.py", "--snapshot-update", *narrowing, f"--golden-dir={goldens}",
                       f"--media={media}", "-rA")
    out = result.stdout.str()
    assert result.ret == 0, out[-3000:]
    assert {k: v for k, v in golden_files(goldens).items() if "renamed" not in k} == before and "deleted" not in out
    kept = re.findall(r"^kept (\S+): (.*)$", out, re.M)
    assert sorted(Path(path).name for path, _ in kept) == [
        "test_golden[image-good.jpg-hf].npz", "test_golden[image-good.jpg-packing].npz"]
    assert all(f"kept because the run is narrowed ({why})" in reason for _, reason in kept)
    count = re.search(r"^kept (\d+) goldens of cases this run did not select \(-v lists them\)$", out, re.M)
    ran = len(re.findall(r"^PASSED parity_tests/test_golden.py::test_golden\[(?!image-renamed)", out, re.M))
    # every golden of an existing case (all but good.jpg's two, renamed away): run or listed as kept
    assert count and int(count.group(1)) + ran == len(before) - 2


def test_goldens_of_a_refused_case_are_kept_with_the_reason(suite, written, tmp_path, monkeypatch) -> None:
    """A case whose parity fails (a packing model whose code shifts the temporal positions, same weights and so the
    same golden folder) is refused: its goldens keep their bytes, and the summary says why."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    packing = build_variant("temporal_off_by_one", tmp_path / "checkpoints")
    goldens = tmp_path / "G"
    shutil.copytree(written / "G", goldens)
    before = golden_files(goldens)
    result = suite.run("parity_tests/test_golden.py", "--snapshot-update", f"--packing-model={packing}",
                       "--trust-remote-code", f"--golden-dir={goldens}", f"--media={written / 'M'}",
                       "-k", "video-astronaut_pan")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert golden_files(goldens) == before
    kept = re.findall(r"^kept (\S+): (.*)$", out, re.M)
    assert sorted(Path(path).name for path, _ in kept) == [
        "test_golden[video-astronaut_pan.mp4-hf].npz", "test_golden[video-astronaut_pan.mp4-packing].npz"]
    assert all(reason.startswith("refused: ") and "parity fails" in reason for _, reason in kept)


# -- a failing golden says what changed


def test_a_golden_written_with_another_opencv_names_the_change(suite) -> None:
    # The golden is first written in this run's environment (CI's lowest-versions run differs from the committed
    # goldens' in more than OpenCV, and an update leaves a golden it matches as it was: it is removed first), then
    # one thing is planted: another OpenCV and pixels that differ.
    target = suite.golden_root / HF_F32 / "test_golden" / "test_golden[image-coffee_small.jpg-hf].npz"
    target.unlink()
    written = suite.run("-k", "golden and coffee_small", "--snapshot-update")
    written.assert_outcomes(passed=2)
    rewrite_golden(target, versions={"opencv": "4.10.0"}, flip_tokens=3)  # as if decoded pixels had differed
    result = suite.run("-k", "golden and coffee_small", "--junitxml=junit.xml")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    line = f"only the environment differs: written with opencv 4.10.0, this run {cv2.__version__}: decoded pixels may differ"
    assert line in out
    assert f"versions.opencv: 4.10.0 -> {cv2.__version__}" in out
    assert out.index(line) < out.index("golden features differ:") < out.index("min projected cosine")
    failure = ET.parse(suite.path / "junit.xml").getroot().find(".//testcase/failure")
    assert line in failure.get("message") + (failure.text or "")


def test_a_golden_of_other_media_is_not_blamed_on_the_environment(suite) -> None:
    target = suite.golden_root / HF_F32 / "test_golden" / "test_golden[image-coffee_small.jpg-hf].npz"
    rewrite_golden(target, versions={"opencv": "4.10.0"}, meta={"media_sha256": "0" * 64}, flip_tokens=3)
    out = suite.run("-k", "golden and coffee_small and hf").stdout.str()
    assert "provenance differs (golden -> this run):" in out and "media_sha256: 0000000000000000..." in out
    assert "only the environment differs" not in out


def test_provenance_diff_rules() -> None:
    old = {"case": "a", "grid_thw": [1, 2, 2], "versions": {"opencv": "5.0.0", "torch": "2.4"}, "device": "cpu",
           "normalization": {"mean": [0.5]}}
    new = {"case": "b", "grid_thw": [1, 3, 3], "versions": {"cv2": "4.10.0", "torch": "2.5"}, "device": "cpu",
           "normalization": {"mean": [0.5]}, "decoder": {"ffmpeg": "7"}}
    diff = provenance_diff(old, new)
    assert [key for key, _, _ in diff.changed] == ["versions.opencv", "versions.torch"]  # case keys left out
    assert diff.only_new == ("decoder.ffmpeg",) and diff.environment_only
    assert diff.likely_cause() == "written with opencv 5.0.0, this run 4.10.0: decoded pixels may differ"
    torch_only = provenance_diff({**old, "versions": {"torch": "2.4"}}, {**old, "versions": {"torch": "2.5"}})
    assert torch_only.likely_cause() == "written with torch 2.4, this run 2.5: kernels and their rounding may differ"
    inputs = provenance_diff(old, {**new, "normalization": {"mean": [0.4]}})
    assert not inputs.environment_only and inputs.likely_cause() is None
    assert "  normalization.mean: [0.5] -> [0.4]" in inputs.lines()
    assert provenance_diff(old, old).lines() == []


# -- drift against a previous release's goldens


@pytest.fixture(scope="module")
def noisy_hf(tmp_path_factory) -> Path:
    """The built-in non-packing checkpoint with 1e-3 relative Gaussian noise on every weight (a re-trained release)."""
    folder = tmp_path_factory.mktemp("noisy") / "tiny-onevision-encoder"
    shutil.copytree(BUILTIN_HF, folder)
    generator = torch.Generator().manual_seed(0)
    for path in weight_files(folder):
        tensors = load_file(path)
        for key, value in tensors.items():
            if value.is_floating_point():
                tensors[key] = value * (1 + 1e-3 * torch.randn(value.shape, generator=generator, dtype=value.dtype))
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


BASELINE_ROW = re.compile(r"^((?:image|video|codec|assets)-\S+)\s+(hf|packing)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.+)$", re.M)


def baseline_rows(out: str) -> dict[str, tuple]:
    section = out.split("vitparity baseline drift", 1)[1]
    return {m.group(1): (m.group(2), int(m.group(3)), float(m.group(4)), float(m.group(5)), float(m.group(6)),
                         m.group(8).strip()) for m in BASELINE_ROW.finditer(section)}


def test_baseline_reports_the_drift_of_a_noisy_release(suite, noisy_hf) -> None:
    baseline = suite.golden_root / HF_F32
    result = suite.run("-m", "golden", "-k", "hf", f"--hf-model={noisy_hf}", f"--golden-baseline={baseline}",
                       "--junitxml=junit.xml")
    out = result.stdout.str()
    assert result.ret == 1 and "no golden for this case and model" in out  # a new fingerprint: no golden yet
    assert f"to measure this model against one (e.g. the previous release's), run with --golden-baseline={baseline}" in out
    rows = baseline_rows(out)
    assert len(rows) == len(list((baseline / "test_golden").glob("*-hf].npz")))  # every case the baseline has
    for case, (side, tokens, min_cos, mean_cos, max_norm, verdict) in rows.items():
        assert side == "hf" and verdict == "report only"
        assert 0.99 < min_cos < 0.99999 and min_cos <= mean_cos < 1.0 and 1e-4 < max_norm < 5e-2, (case, rows[case])
    properties = [json.loads(p.get("value")) for p in
                  ET.parse(suite.path / "junit.xml").getroot().iter("property") if p.get("name") == "vitparity_baseline"]
    assert sorted(p["case"] for p in properties) == sorted(rows)
    assert all(abs(p["min_cos"] - rows[p["case"]][2]) < 1e-6 for p in properties)

    limited = suite.run("-m", "golden", "-k", "hf and coffee_small", f"--hf-model={noisy_hf}",
                        f"--golden-baseline={baseline}", "--baseline-min-cos=0.99999")
    assert "is not above --baseline-min-cos=0.99999" in limited.stdout.str()
    assert "FAIL (min cos > 0.99999)" in limited.stdout.str()


def test_baseline_of_the_same_weights_under_another_folder_reports_cosine_one(suite, tmp_path) -> None:
    same = Path(shutil.copytree(BUILTIN_HF, tmp_path / "release-copy"))
    result = suite.run("-m", "golden", "-k", "hf", f"--hf-model={same}",
                       f"--golden-baseline={suite.golden_root / HF_F32}", "--baseline-min-cos=0.999999")
    assert result.ret == 0, result.stdout.str()[-3000:]
    rows = baseline_rows(result.stdout.str())
    assert len(rows) == len(list((suite.golden_root / HF_F32 / "test_golden").glob("*-hf].npz")))
    # cosine 1.0 to the 6 decimals printed; norms within float32 rounding of the machine that wrote the goldens
    assert all(row[2] == 1.0 and row[3] == 1.0 and row[4] < 1e-5 for row in rows.values()), rows
    assert all(row[5] == "PASS (min cos > 0.999999)" for row in rows.values())


@pytest.mark.parametrize("folder, args, words", [
    ("siglip-0123456789ab-float32-8of64-crop", [],
     "model type siglip, this pair's models are onevision_encoder and onevision_encoder_packing"),
    ("onevision_encoder-41bbf9a8a5e4-bfloat16-8of64-crop", [], "dtype bfloat16, this run float32"),
    (HF_F32, ["--num-frames=4"], "frame protocol 8of64, this run 4of64"),
    (HF_F32, ["--align=pad"], "align crop, this run pad"),
    ("release-1", [], "not a golden folder"),
])
def test_a_baseline_made_another_way_is_a_usage_error(suite, tmp_path, folder, args, words) -> None:
    path = tmp_path / folder
    path.mkdir()
    result = suite.run(f"--golden-baseline={path}", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--golden-baseline={path}: {words}" in result.stderr.str()


PACKING_F32 = "onevision_encoder_packing-0a8da2050499-float32-8of64-crop"
SIDE_ROW = re.compile(r"^((?:image|video)-\S+)\s+(hf|packing)\s+\d+\s+(\S+)\s", re.M)


def fake_golden_folder(path: Path, width: int, layers: int | None = None) -> Path:
    """A golden folder whose one golden holds features of `width` from a model of `layers` layers."""
    (path / "test_golden").mkdir(parents=True)
    meta = {"feature_shape": [4, width], **({"layers": layers} if layers is not None else {})}
    np.savez(path / "test_golden" / "test_golden[image-coffee_small.jpg-hf].npz", projection=np.zeros((4, 16), np.float16),
             norms=np.ones(4, np.float32), meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return path


def test_baseline_root_measures_both_models_in_one_run(suite, tmp_path) -> None:
    """The previous release's golden root: the folder of each model under this run's settings is chosen in it."""
    root = tmp_path / "v1-golden"
    for name in (HF_F32, PACKING_F32, "onevision_encoder-41bbf9a8a5e4-bfloat16-8of64-crop"):
        shutil.copytree(suite.golden_root / name, root / name)
    result = suite.run("-m", "golden", "-k", "coffee_small", f"--golden-baseline={root}", "--baseline-min-cos=0.999")
    out = result.stdout.str()
    assert result.ret == 0, out[-3000:]
    rows = {(m.group(1), m.group(2)): float(m.group(3)) for m in SIDE_ROW.finditer(out.split("baseline drift")[1])}
    assert rows == {("image-coffee_small.jpg", "hf"): 1.0, ("image-coffee_small.jpg", "packing"): 1.0}
    assert f"against hf {root / HF_F32}, packing {root / PACKING_F32}" in out

    shutil.copytree(root / HF_F32, root / HF_F32.replace("41bbf9a8a5e4", "0123456789ab"))  # two releases' folders
    twice = suite.run("-m", "golden", f"--golden-baseline={root}")
    assert twice.ret == pytest.ExitCode.USAGE_ERROR and "2 baseline folders for the hf model" in twice.stderr.str()


def test_the_readme_release_command_works_on_a_new_release(suite, noisy_hf, tmp_path) -> None:
    """README's command as written, on a re-trained release (both checkpoints of the pair: its packing one converted
    from its non-packing one, so the pair itself is at parity and its goldens may be written): its goldens are
    written, both models are measured."""
    from vitparity.convert import convert_checkpoint

    packing = convert_checkpoint(noisy_hf, tmp_path / "tiny-onevision-encoder-packing")
    result = suite.run("-m", "golden", "-k", "coffee_small", f"--hf-model={noisy_hf}", f"--packing-model={packing}",
                       f"--golden-dir={tmp_path / 'goldens-v2'}", "--snapshot-update",
                       f"--golden-baseline={suite.golden_root}")
    out = result.stdout.str()
    assert result.ret == 0, out[-3000:]
    rows = {(m.group(1), m.group(2)): float(m.group(3)) for m in SIDE_ROW.finditer(out.split("baseline drift")[1])}
    assert 0.99 < rows[("image-coffee_small.jpg", "hf")] < 0.99999 and 0.99 < rows[("image-coffee_small.jpg", "packing")] < 0.99999
    assert len(list((tmp_path / "goldens-v2").rglob("*.npz"))) == 2
    assert "vitparity golden update" in out and "nothing deleted or kept" in out  # the section after every update


# -- missing goldens are their own state

COFFEE = ("image-coffee_small.jpg", "video-coffee_zoom.mp4", "codec-coffee_zoom.mp4")  # the cases of -k COFFEE_K
COFFEE_K = "coffee_small or coffee_zoom"
MISSING_LINE = re.compile(r"^missing goldens: (.+); write them with: (.+)$", re.M)


def test_missing_goldens_of_new_weights_are_counted_apart_from_a_regression(suite, noisy_hf, capsys) -> None:
    """A candidate with new hf weights (no golden folder of its fingerprint) and one packing golden that differs
    (planted): 3 missing goldens and 1 regression, counted apart in the summary, the JUnit XML and report-junit, one
    line with why and the command; the run still fails."""
    planted = "test_golden[image-coffee_small.jpg-packing]"
    rewrite_golden(suite.golden_root / PACKING_F32 / "test_golden" / f"{planted}.npz", flip_tokens=4)
    result = suite.run("-m", "golden", "-k", COFFEE_K, f"--hf-model={noisy_hf}", "--junitxml=junit.xml")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, failed=4)  # hf: 3 missing; packing: 1 regression, 2 match
    line = MISSING_LINE.search(out)
    assert line, out[-3000:]
    fingerprint = re.fullmatch(r"new weights of hf with fingerprint ([0-9a-f]{12}) have no goldens: 3 cases",
                               line.group(1)).group(1)
    assert fingerprint not in HF_F32
    command = f"pytest -m golden --snapshot-update --hf-model={noisy_hf} --device=cpu"
    assert line.group(2) == f"{command} (it also rewrites the golden that differs: review the regressions first)"
    count_line = f"goldens: 1 regression, 3 missing (new weights hf {fingerprint}), 2 match"
    assert count_line in out
    folder = suite.golden_root / HF_F32.replace("41bbf9a8a5e4", fingerprint)
    labelled = f"missing golden: no golden for this case and model in {folder} (new weights hf {fingerprint})"
    failed = [report.longreprtext for report in result.reprec.getreports("pytest_runtest_logreport") if report.failed]
    assert sum(labelled in text for text in failed) == 3 and sum("golden features differ:" in text for text in failed) == 1

    tests = {case.get("name"): case for case in ET.parse(suite.path / "junit.xml").getroot().iter("testcase")}
    states = {name: {p.get("name"): p.get("value") for p in case.iter("property")}.get("vitparity_golden_state")
              for name, case in tests.items()}
    assert states == {**{f"test_golden[{case}-hf]": "missing" for case in COFFEE},
                      **{f"test_golden[{case}-packing]": "match" for case in COFFEE}, planted: "regression"}
    assert all("missing golden: no golden" in tests[f"test_golden[{case}-hf]"].find("failure").get("message")
               for case in COFFEE)
    summary = json.loads(next(p.get("value") for p in ET.parse(suite.path / "junit.xml").getroot().iter("property")
                              if p.get("name") == "vitparity_goldens"))
    assert (summary["match"], summary["regression"], summary["missing"], summary["command"]) == (2, 1, 3, command)

    capsys.readouterr()
    assert main(["report-junit", str(suite.path / "junit.xml")]) == 1
    report = capsys.readouterr().out
    assert "FAIL: 6 tests from 1 JUnit files: 2 passed, 1 failed, 3 missing goldens, 0 error, 0 skipped." in report
    assert count_line in report and "### Missing goldens (3)" in report and line.group(0) in report.splitlines()
    failed = report.split("### Failed tests (1)\n", 1)[1].split("###", 1)[0]
    assert planted in failed and "-hf]" not in failed  # the missing goldens are not listed as failures


def test_the_command_of_the_missing_goldens_line_writes_them(suite, noisy_hf, tmp_path) -> None:
    """A new release (both models new weights, the pair at parity): the line's command, as printed, writes the
    missing goldens (narrowed here to the one case with -k), after which the same run passes."""
    from vitparity.convert import convert_checkpoint

    packing = convert_checkpoint(noisy_hf, tmp_path / "tiny-onevision-encoder-packing")
    run = ("-m", "golden", "-k", "coffee_small", f"--hf-model={noisy_hf}", f"--packing-model={packing}")
    missing = suite.run(*run)
    line = MISSING_LINE.search(missing.stdout.str())
    assert missing.ret == pytest.ExitCode.TESTS_FAILED and line, missing.stdout.str()[-3000:]
    assert re.fullmatch(r"new weights of hf with fingerprint [0-9a-f]{12} have no goldens: 1 case; new weights of "
                        r"packing with fingerprint [0-9a-f]{12} have no goldens: 1 case", line.group(1))
    command = shlex.split(line.group(2))
    assert command[:4] == ["pytest", "-m", "golden", "--snapshot-update"]
    assert suite.run(*command[1:], "-k", "coffee_small").ret == pytest.ExitCode.OK
    again = suite.run(*run)
    assert again.ret == pytest.ExitCode.OK and "goldens: 0 regressions, 0 missing, 2 match" in again.stdout.str()
    assert "missing goldens:" not in again.stdout.str()


def test_why_a_golden_is_missing(tmp_path) -> None:
    """New cases (the folder exists), new settings (only folders of the same weights under other settings), new
    weights (no folder of the fingerprint, or no golden root at all)."""
    root = tmp_path / "golden"
    (root / HF_F32 / "test_golden").mkdir(parents=True)
    cases = missing_why("hf", root / HF_F32)
    settings = missing_why("hf", root / HF_F32.replace("8of64", "4of64"))
    weights = missing_why("packing", root / PACKING_F32.replace("0a8da2050499", "0123456789ab"))
    assert missing_why("hf", tmp_path / "nowhere" / HF_F32).kind == NEW_WEIGHTS
    assert [why.short() for why in (cases, settings, weights)] == [
        "new cases hf", "new settings hf float32-4of64-crop", "new weights packing 0123456789ab"]
    tally = GoldenTally()
    assert tally.missing_line("pytest") == ""
    for why in (cases, settings, settings, weights):
        tally.add(MISSING, why)
    assert tally.count_line() == ("goldens: 0 regressions, 4 missing (new cases hf, new settings hf float32-4of64-crop, "
                                  "new weights packing 0123456789ab), 0 match")
    assert tally.missing_line("pytest -m golden --snapshot-update") == (
        f"missing goldens: 1 case of hf has no golden in {HF_F32}; the weights of hf (fingerprint 41bbf9a8a5e4) have "
        "no goldens for float32-4of64-crop: 2 cases; new weights of packing with fingerprint 0123456789ab have no "
        "goldens: 1 case; write them with: pytest -m golden --snapshot-update")


@pytest.mark.parametrize("width, layers, words", [
    (128, None, "cannot be compared with the hf model: feature width 128, this run's model 64"),
    (64, 12, "cannot be compared with the hf model: layer count 12, this run's model 4"),
])
def test_an_incomparable_baseline_is_a_usage_error_naming_the_difference(suite, tmp_path, width, layers,
                                                                          words) -> None:
    folder = fake_golden_folder(tmp_path / HF_F32, width, layers)
    result = suite.run(f"--golden-baseline={folder}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and words in result.stderr.str(), result.stderr.str()
    nothing = suite.run(f"--golden-baseline={tmp_path}{os.pathsep}{tmp_path}")
    assert nothing.ret == pytest.ExitCode.USAGE_ERROR and "is listed twice" in nothing.stderr.str()
    repeated = suite.run(f"--golden-baseline={folder}", f"--golden-baseline={tmp_path}")
    assert repeated.ret == pytest.ExitCode.USAGE_ERROR
    assert "--golden-baseline is given 2 times and the last would replace the others" in repeated.stderr.str()


def test_the_missing_golden_hint_proposes_only_comparable_folders(tmp_path) -> None:
    """A real checkpoint (width 1024) is never pointed at the tiny model's goldens (width 64) of the same type."""
    this = tmp_path / "onevision_encoder-aaaaaaaaaaaa-float32-8of64-crop"
    fake_golden_folder(tmp_path / HF_F32, 64)
    fake_golden_folder(tmp_path / "onevision_encoder-bbbbbbbbbbbb-float32-8of64-crop", 1024)
    lines = other_model_folders_hint(this, 1024)
    assert "onevision_encoder-bbbbbbbbbbbb-float32-8of64-crop" in lines[0] and HF_F32 not in lines[0]
    assert other_model_folders_hint(this, 768) == []


def test_baseline_min_cos_needs_a_baseline(suite) -> None:
    result = suite.run("--baseline-min-cos=0.99")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--baseline-min-cos=0.99: needs --golden-baseline" in result.stderr.str()


def test_a_corrupt_baseline_golden_is_an_error_naming_the_file(suite, tmp_path) -> None:
    baseline = Path(shutil.copytree(suite.golden_root / HF_F32, tmp_path / HF_F32))
    target = baseline / "test_golden" / "test_golden[image-coffee_small.jpg-hf].npz"
    target.write_bytes(b"PK\x03\x04 not a zip")
    result = suite.run("-m", "golden", "-k", "coffee_small", f"--golden-baseline={baseline}")
    result.assert_outcomes(passed=1, failed=1)
    assert f"baseline golden {target}: golden file is not a readable vitparity npz" in result.stdout.str()


# -- goldens a reviewer can read


@pytest.fixture
def two_folders(tmp_path) -> tuple[Path, Path]:
    """OLD: the committed float32 goldens. NEW: the hf model's goldens under another fingerprint (a new release),
    one of them changed (three tokens flipped, written with another OpenCV), one removed, one added."""
    old, new = tmp_path / "old", tmp_path / "new"
    for folder in (HF_F32, PACKING_F32):
        shutil.copytree(REPO / "fixtures" / "golden" / folder, old / folder)
        shutil.copytree(REPO / "fixtures" / "golden" / folder, new / folder.replace("41bbf9a8a5e4", "feedfacecafe"))
    hf = new / HF_F32.replace("41bbf9a8a5e4", "feedfacecafe") / "test_golden"
    rewrite_golden(hf / "test_golden[image-coffee_small.jpg-hf].npz", versions={"opencv": "4.10.0"}, flip_tokens=3)
    (hf / "test_golden[video-rocket_tilt.mp4-hf].npz").unlink()
    shutil.copy(hf / "test_golden[image-astronaut.jpg-hf].npz", hf / "test_golden[image-added.jpg-hf].npz")
    return old, new


def committed_opencv() -> str:
    """The OpenCV version recorded in the committed golden that `two_folders` rewrites (the OLD side)."""
    with np.load(REPO / "fixtures" / "golden" / HF_F32 / "test_golden" / "test_golden[image-coffee_small.jpg-hf].npz") as archive:
        versions = json.loads(archive["meta"].tobytes().decode("utf-8"))["versions"]
    opencv = versions.get("cv2", versions.get("opencv"))
    assert opencv != "4.10.0"  # the version the tests rewrite it to must be a change
    return opencv


def committed_float32_goldens() -> int:
    """Goldens of both models in the committed float32 folders (the OLD side of `two_folders`)."""
    return sum(len(list((REPO / "fixtures" / "golden" / folder / "test_golden").glob("*.npz")))
               for folder in (HF_F32, PACKING_F32))


def golden_diff(capsys, *args) -> tuple[int, str, str]:
    code = main(["golden-diff", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def check_two_folder_diff(out: str) -> None:
    key = "onevision_encoder-*-float32-8of64-crop/test_golden/test_golden[image-coffee_small.jpg-hf].npz"
    block = out.split(key + "\n", 1)[1].split("\nonevision", 1)[0].splitlines()
    figures = re.fullmatch(r"  tokens 35, grid 1x5x7; cos min (\S+) \(token (\d+)\) mean (\S+); "
                           r"norm drift max (\S+) \(token \d+\) mean (\S+)", block[0])
    assert figures and float(figures.group(1)) < -0.99 and int(figures.group(2)) < 3  # a flipped token is the worst
    assert 0.5 < float(figures.group(3)) < 1 and float(figures.group(4)) == float(figures.group(5)) == 0.0
    old = committed_opencv()
    assert block[1:4] == [f"  only the environment differs: OLD opencv {old}, NEW 4.10.0: decoded pixels may differ",
                         "  provenance differs (OLD -> NEW):", f"    versions.opencv: {old} -> 4.10.0"]
    assert f"only in OLD: {HF_F32}/test_golden/test_golden[video-rocket_tilt.mp4-hf].npz" in out
    new_folder = HF_F32.replace("41bbf9a8a5e4", "feedfacecafe")
    assert f"only in NEW: {new_folder}/test_golden/test_golden[image-added.jpg-hf].npz" in out
    assert out.rstrip().endswith(f"{committed_float32_goldens() - 2} identical, 1 changed, 1 added, 1 removed")
    assert "test_golden[image-astronaut.jpg-hf].npz" not in out  # byte-identical: counted, not listed (README)


def test_golden_diff_of_two_folders(two_folders, capsys) -> None:
    code, out, _ = golden_diff(capsys, *two_folders)
    assert code == 0
    check_two_folder_diff(out)
    code, new_only, _ = golden_diff(capsys, "--new-only", *two_folders)
    assert code == 0 and "only in OLD" not in new_only.replace("only in OLD (not listed)", "")
    assert new_only.rstrip().endswith(f"{committed_float32_goldens() - 2} identical, 1 changed, 1 added, 1 only in OLD (not listed)")


def test_golden_diff_of_one_folder_at_two_git_revisions(two_folders, tmp_path, capsys, monkeypatch) -> None:
    old, new = two_folders
    repo = git_repo(tmp_path / "repo", old, new)
    monkeypatch.chdir(repo)
    code, out, _ = golden_diff(capsys, "HEAD~1:golden", "HEAD:golden")
    assert code == 0
    check_two_folder_diff(out)


def git_repo(path: Path, *states: Path) -> Path:
    """A git repository whose folder `golden` holds each of `states` in one commit."""
    path.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "tests@example.org")
    git("config", "user.name", "tests")
    for index, state in enumerate(states):
        shutil.rmtree(path / "golden", ignore_errors=True)
        shutil.copytree(state, path / "golden")
        git("add", "-A")
        git("commit", "-q", "-m", f"state {index}")
    return path


@pytest.mark.parametrize("damage, words", [
    ("corrupt", "not a readable vitparity npz"),
    ("missing", "no such folder"),
])
def test_golden_diff_bad_input_is_an_error_naming_it(two_folders, capsys, damage, words) -> None:
    old, new = two_folders
    target = next(new.rglob("test_golden[[]image-chelsea_cat.png-hf].npz"))
    if damage == "corrupt":
        target.write_bytes(b"\x00" * 100)
    else:
        new = new / "nowhere"
    code, out, err = golden_diff(capsys, old, new)
    assert code == 2 and not out
    named = target if damage == "corrupt" else new
    assert err.startswith(f"vitparity: error: {named}: ") and words in err


def test_git_textconv_shows_provenance_and_summary(tmp_path) -> None:
    """`git diff` of a golden whose tokens and recorded OpenCV changed, with the documented attribute and config."""
    old = tmp_path / "old"
    shutil.copytree(REPO / "fixtures" / "golden" / HF_F32, old / HF_F32)
    new = Path(shutil.copytree(old, tmp_path / "new"))
    name = f"{HF_F32}/test_golden/test_golden[image-coffee_small.jpg-hf].npz"
    rewrite_golden(new / name, versions={"opencv": "4.10.0"}, flip_tokens=3)
    repo = git_repo(tmp_path / "repo", old, new)
    (repo / ".gitattributes").write_text((REPO / ".gitattributes").read_text().replace("fixtures/golden/", "golden/"))
    subprocess.run(["git", "config", "diff.vitparity-golden.textconv", f"{sys.executable} -m vitparity golden-show"],
                   cwd=repo, check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    diff = subprocess.run(["git", "diff", "HEAD~1", "HEAD"], cwd=repo, env=env, capture_output=True, text=True,
                          check=True).stdout
    assert "Binary files" not in diff and f"golden/{name}" in diff
    assert f"-  versions.opencv: {committed_opencv()}" in diff and "+  versions.opencv: 4.10.0" in diff
    assert re.search(r"^-projection sha256 [0-9a-f]{16}$", diff, re.M)
    assert re.search(r"^\+projection sha256 [0-9a-f]{16}$", diff, re.M)
    assert re.search(r"^ norms sha256 [0-9a-f]{16}$", diff, re.M)  # the norms did not change
    assert " tokens 35, feature shape [35, 64], grid 1x5x7, projection [35, 16] float16" in diff


def test_golden_files_map_to_their_cases() -> None:
    """Escaped non-ASCII ids and scaled cases whose id extends another's find their own case; other names none."""
    cases = ["image-a.jpg", "image-a.jpg@0.5", "image-caf\u00e9.jpg"]
    stems = {golden_file_stem(case): case for case in cases}
    module, stem = golden_key("parity_tests/test_golden.py::test_golden[image-caf\\xe9.jpg-hf]")
    assert module == "test_golden" and case_of_file(stem, stems) == "image-caf\u00e9.jpg"
    assert case_of_file("test_golden[image-a.jpg@0.5-packing]", stems) == "image-a.jpg@0.5"
    assert case_of_file("test_golden[image-a.jpg-hf]", stems) == "image-a.jpg"
    assert case_of_file("test_golden[image-b.jpg-hf]", stems) is None
    assert case_of_file("test_golden[image-a.jpgx-hf]", stems) is None
