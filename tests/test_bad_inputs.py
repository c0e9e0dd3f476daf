"""Bad inputs to the parity suite: each gives a clear message naming the thing and the cause, writes nothing,
and loses no other case's result."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.cli import main
from vitparity.loading import weight_files
from vitparity.media_check import MediaCheckError, MediaUse, check_media

from conftest import edited_checkpoint, verdicts


def broken_checkpoint(tmp_path: Path, kind: str) -> Path:
    """A copy of the built-in HF checkpoint broken in one way."""
    folder = tmp_path / kind
    if kind == "missing":
        return folder
    shutil.copytree(BUILTIN_HF, folder)
    weights = weight_files(folder)
    if kind == "no-weights":
        for path in weights:
            path.unlink()
    elif kind == "truncated":
        data = weights[0].read_bytes()
        weights[0].write_bytes(data[: len(data) // 2])
    elif kind == "remote-code":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "someone_elses_encoder"
        config["auto_map"] = {"AutoModel": "modeling_someone.SomeoneModel"}
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "kind, words",
    [
        ("no-weights", "no weight"),
        ("truncated", "cannot read safetensors weights"),
    ],
)
def test_unloadable_model_fails_every_test_with_one_clear_message(suite, tmp_path, kind, words) -> None:
    folder = broken_checkpoint(tmp_path, kind)
    before = suite.goldens()
    result = suite.run(f"--hf-model={folder}", "-k", "coffee or packed")
    assert result.ret == 1
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "Traceback" not in out
    outcomes = result.parseoutcomes()
    assert "passed" not in outcomes
    assert out.count(f"{folder}") >= outcomes.get("failed", 0) + outcomes.get("errors", 0) >= 10
    assert words in out
    assert suite.goldens() == before
    # the hf checkpoint's problem, named as such in the packing model's own test
    weights = suite.run(f"--hf-model={folder}", "-k", "loaded_weights").stdout.str()
    assert f"the packing model is not checked: the hf model did not load: {folder}" in weights


def test_problems_known_before_any_test_are_one_usage_error(suite, tmp_path) -> None:
    """A missing checkpoint, swapped sides or configs that define other weights: one message at start, no test."""
    swapped = [f"--hf-model={BUILTIN_PACKING}", f"--packing-model={BUILTIN_HF}"]
    other = edited_checkpoint(BUILTIN_PACKING, tmp_path / "other-theta", rope_theta=5000.0)
    remote = broken_checkpoint(tmp_path, "remote-code")
    for args, words in [
        ([f"--hf-model={remote}"], "ships its own code (config.json auto_map AutoModel: modeling_someone.SomeoneModel)"),
        ([f"--hf-model={tmp_path / 'missing'}"], "model path does not exist"),
        (swapped, "given as the hf model but it is a packing model"),
        ([f"--packing-model={other}"], "do not describe the same model (fields that define the weights): rope_theta"),
    ]:
        result = suite.run(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, args
        assert words in result.stderr.str() and "failed" not in result.stdout.str()
        assert result.stderr.str().count(words) == 1


def media_folder(tmp_path: Path) -> Path:
    """Extra media: one good image plus a corrupt image, a corrupt video and an empty video."""
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(BUILTIN_MEDIA / "coffee_small.jpg", folder / "good_copy.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (folder / "corrupt.mp4").write_bytes(bytes(range(256)) * 8)
    (folder / "empty.mp4").write_bytes(b"")
    return folder


def broken_videos(tmp_path: Path) -> Path:
    """Good media (an image, a video) and two broken videos: an mp4 cut in half, and garbage bytes named .mp4."""
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(BUILTIN_MEDIA / "coffee_small.jpg", folder / "good.jpg")
    shutil.copy(BUILTIN_MEDIA / "rocket_tilt.mp4", folder / "good.mp4")
    data = (BUILTIN_MEDIA / "coffee_zoom.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "garbage.mp4").write_bytes(bytes(range(256)) * 40)
    return folder


def assert_one_media_error(stderr: str, folder: Path, prefix: str) -> None:
    """stderr is the one message that names both broken videos with a reason (and what the decoder wrote for them),
    once each: no line of it comes raw from OpenCV or FFmpeg."""
    lines = stderr.strip().splitlines()
    assert lines[0] == f"{prefix}2 media files cannot be used (every file is decoded before any model loads):", stderr
    for name in ("truncated.mp4", "garbage.mp4"):
        named = [line for line in lines if str(folder / name) in line]
        assert len(named) == 1 and named[0].startswith(f"  {folder / name}: not a readable video: "), stderr
        assert "the decoder wrote: [mov,mp4,m4a,3gp,3g2,mj2] moov atom not found" in named[0]
    assert len(lines) == 3 and "good." not in stderr, stderr  # nothing else: no raw decoder line


def test_broken_media_are_one_usage_error_before_any_model_loads(suite, tmp_path) -> None:
    """As users run it (a process of its own, under xdist): every media file is decoded in the controller before the
    workers start, so the run stops at once with one message naming both broken videos; no test runs, no model
    loads, and OpenCV's and FFmpeg's stderr lines are in the message, not raw on stderr."""
    folder = broken_videos(tmp_path)
    result = suite.pytester.runpytest_subprocess("-p", "no:cacheprovider", "--device=cpu", f"--media={folder}",
                                                 "-n", "2", timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert_one_media_error(result.stderr.str(), folder, "ERROR: ")
    assert result.stdout.str().strip() == ""  # no session started: no test collected or run, no model loaded


def test_broken_media_stop_extract_and_gate_before_any_model_loads(tmp_path, capfd, monkeypatch) -> None:
    """`vitparity extract` (exit 2, no folder written) and `vitparity gate` (the suite's usage error, from the
    pytest process it starts) the same way; capfd reads file descriptors 1 and 2, where native code writes."""
    folder = broken_videos(tmp_path)
    output = tmp_path / "features"
    code = main(["extract", "--image1", str(folder / "good.jpg"), "--video1", str(folder / "truncated.mp4"), "--videos",
                 str(folder / "good.mp4"), str(folder / "garbage.mp4"), "--codec", "--device=cpu", "--output_dir",
                 str(output)])
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and not output.exists()
    assert_one_media_error(err, folder, "vitparity: error: ")
    for name in [n for n in os.environ if n.startswith(("PYTEST_XDIST_", "VITPARITY_"))]:
        monkeypatch.delenv(name)  # the gate's pytest is a session of its own, not configured by this one's variables
    monkeypatch.chdir(tmp_path)  # a folder of its own: no ini file, so the built-in goldens
    code = main(["gate", "-p", "no:cacheprovider", "--device=cpu", f"--media={folder}"])
    out, err = capfd.readouterr()
    assert code == pytest.ExitCode.USAGE_ERROR and out.strip() == ""
    assert_one_media_error(err, folder, "ERROR: ")


def test_check_media_lists_every_file_that_cannot_be_used(tmp_path) -> None:
    """Images whole, videos at each frame count used, asset folders complete: each broken file named once, in order."""
    folder = media_folder(tmp_path)
    uses = [MediaUse(folder / "good_copy.jpg", "image"), MediaUse(folder / "corrupt.jpg", "image"),
            MediaUse(BUILTIN_MEDIA / "coffee_zoom.mp4", "video", 8), MediaUse(folder / "corrupt.mp4", "video", 8),
            MediaUse(folder / "corrupt.mp4", "video", 64), MediaUse(folder / "empty.mp4", "video", 8),
            MediaUse(tmp_path / "assets", "assets")]
    with pytest.raises(MediaCheckError) as error:
        check_media(uses, patch_size=14, align="crop")
    problems = error.value.problems
    assert [Path(problem.path).name for problem in problems] == ["corrupt.jpg", "corrupt.mp4", "empty.mp4",
                                                                  "meta.json"]
    assert "truncated JPEG" in problems[0].reason and "file is empty" in problems[2].reason
    assert "missing (a codec asset folder needs" in problems[3].reason
    assert str(error.value).count("\n  ") == 4
    kept = check_media(uses[:1] + uses[2:3], patch_size=14, align="crop", keep=True)
    assert kept[uses[2]].frames.shape[0] == 8 and check_media(uses[:1], patch_size=14, align="crop") == {}


def test_a_file_that_breaks_after_the_media_check_fails_its_own_cases_only(suite, tmp_path, monkeypatch) -> None:
    """A file that breaks once the run has checked it (still being written): its cases fail, the others pass."""
    monkeypatch.setattr("vitparity.suite.media_preflight.check_run_media", lambda *args: None)
    before = suite.goldens()
    result = suite.run(f"--media={media_folder(tmp_path)}", "-m", "not golden", "-W", "default")
    out = result.stdout.str()
    assert result.ret == 1 and "INTERNALERROR" not in out
    failed = {line.split()[1] for line in result.outlines if line.startswith(("FAILED", "ERROR"))}
    broken = {"image-corrupt.jpg", "video-corrupt.mp4", "video-empty.mp4", "codec-corrupt.mp4", "codec-empty.mp4"}
    assert {node.split("[")[1].rstrip("]") for node in failed} == broken  # per-case tests of the broken files
    for name in ("corrupt.jpg", "corrupt.mp4", "empty.mp4"):
        assert name in out
    assert re.search(r"left out of pack pack-[0-9a-f]{8}: ", out)  # a pack names what it could not include
    found = verdicts(out)
    assert found["image-good_copy.jpg"] == "PASS" and found["packed/image-good_copy.jpg"] == "PASS"
    compared = re.search(r"^(\d+) comparisons, (\d+) passed, 0 failed$", out, re.M)  # every readable case's rows
    assert compared and compared[1] == compared[2] and "FAIL" not in found.values(), out[-3000:]
    assert suite.goldens() == before


def test_media_folder_problems_are_usage_errors(suite, tmp_path) -> None:
    """A missing, empty or mixed --media folder stops the run before any case: no file is skipped silently."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "clip.svg").write_bytes(b"<svg/>")
    (mixed / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    for folder, words in (
        ("nowhere", "media folder not found"),
        ("empty", "no image or video files"),
        ("mixed", "2 entries are not image or video files: clip.svg, sub/"),
    ):
        result = suite.run(f"--media={tmp_path / folder}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert f"--media: {tmp_path / folder}: {words}" in result.stderr.str()


def test_own_media_alone_and_a_case_by_its_exact_file(suite, tmp_path) -> None:
    """--no-bundled-media with --media: only the files given (a folder and a single file, separated by
    os.pathsep) are cases; a name that is a substring of bundled ones (pan) selects only its own file."""
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(BUILTIN_MEDIA / "coffee_small.jpg", own / "espresso.jpg")
    pan = tmp_path / "pan.mp4"
    shutil.copy(BUILTIN_MEDIA / "coffee_zoom.mp4", pan)
    result = suite.run("-m", "not golden", "--no-bundled-media", f"--media={own}{os.pathsep}{pan}", "-p", "no:randomly")
    assert result.ret == 0, result.stdout.str()[-2000:]
    # Each own file's case, plus the video's codec-style case; every one alone and packed, with its whole outputs;
    # the videos' explicit-position paths; the codec-style case's token orders; each case's row of an hf batch; the
    # image and the video in a pack called grid_thw only. The table cuts names at 32 columns.
    cases = ("image-espresso.jpg", "video-pan.mp4", "codec-pan.mp4")
    rows = {f"{prefix}{case}" for case in cases
            for prefix in ("", "packed/", "last_hidden_state/", "pooler_output/")}
    rows |= {f"pos~{path}/{case}" for case in cases[1:] for path in ("ctx", "packing")}
    rows |= {f"order~{order}/codec-pan.mp4" for order in ("mosaic", "packing", "sparse")}
    rows |= {f"batch/{case}" for case in cases} | {f"grid/{case}" for case in cases[:2]}  # hf batch rows, grid_thw call
    shown = {row if len(row) <= 32 else row[:29] + "..." for row in rows}
    assert verdicts(result.stdout.str()) == dict.fromkeys(shown, "PASS")
    out = result.stdout.str()
    # One pack: the image (35 tokens), the video and its codec-style case (768 tokens each).
    assert re.search(r"^largest pack: pack-\w+ 1,571 of 16,384 tokens \(9\.6% of its budget\); largest case: "
                     r"video-pan\.mp4 768 tokens \(estimated\)(;|$)", out, re.M), out[-3000:]
    worst = "|".join(re.escape(row) for row in shown)
    assert re.search(rf"^worst case: ({worst}) PASS, min cos", out, re.M)
    for args, words in ((("--no-bundled-media",), "--no-bundled-media: needs --media"),
                        ((f"--media={own}{os.pathsep}{own}",), "is listed twice"),
                        ((f"--media={tmp_path / 'notes.txt'}",), "unknown media extension '.txt'")):
        (tmp_path / "notes.txt").write_text("not media")
        bad = suite.run(*args)
        assert bad.ret == pytest.ExitCode.USAGE_ERROR and words in bad.stderr.str(), (args, bad.stderr.str())


def test_float16_on_cpu_is_a_usage_error(suite) -> None:
    result = suite.run("--dtype", "float16")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "float16" in result.stderr.str() and "CPU" in result.stderr.str()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_usage_error(suite) -> None:
    """The device rule: a requested device that is absent is a usage error naming the option, never a skip."""
    before = suite.goldens()
    result = suite.run("-k", "coffee", "--device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--device=cuda: requested but CUDA is not available" in result.stderr.str()
    assert suite.goldens() == before


def test_gpu_plan_explains_what_it_leaves_out(suite) -> None:
    """The GPU plan's policies (sample; bfloat16, 131072-token packs) on the CPU: the unsampled re-runs,
    alone-vs-packed comparisons and unsampled test_outputs are left out, not deselected (a full run stays full for
    syrupy's unused-golden check), and each is named with its reason."""
    whole = suite.run("--determinism=sample", "--companions=sample", "--outputs=sample", "--dtype=bfloat16",
                      "--pack-tokens=131072")
    assert "deselected" not in whole.stdout.str()
    assert "not run by the plan (--determinism=sample: case not re-run): test_deterministic[" in whole.stdout.str()
    assert "not run by the plan (--companions=sample: packing features come from the pack" in whole.stdout.str()
    assert "not run by the plan (--outputs=sample: case's last_hidden_state and pooler_output not compared)" in (
        whole.stdout.str())
    assert sum(left_out_counts(whole.stdout.str())) > 0


def test_corrupted_golden_fails_its_test_only(suite) -> None:
    target = next(suite.golden_root.glob("*-float32-*/test_golden/test_golden[[]image-coffee_small.jpg-hf].npz"))
    target.write_bytes(b"PK\x03\x04 not really a zip")
    result = suite.run("-m", "golden")
    goldens = len(list(suite.golden_root.glob("*-float32-*/test_golden/test_golden[[]*].npz")))  # one test each
    result.assert_outcomes(passed=goldens - 1, failed=1)
    out = result.stdout.str()
    assert "test_golden[image-coffee_small.jpg-hf]" in out and "not a readable vitparity npz" in out
    assert target.read_bytes() == b"PK\x03\x04 not really a zip"  # reported, never silently rewritten


@pytest.mark.parametrize("first, second", [("astronaut.jpg", "astronaut.jpg"), ("\u00fc.jpg", "xfc.jpg")])
def test_media_that_would_share_a_golden_is_a_usage_error(suite, tmp_path, first, second) -> None:
    """Two files whose cases would share a test id or a golden file name (pytest escapes non-ASCII ids)."""
    folder = tmp_path / "extra"
    folder.mkdir()
    source = BUILTIN_MEDIA / "coffee_small.jpg"
    for name in {first, second}:
        shutil.copy(source, folder / name)
    result = suite.run(f"--media={folder}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "would share the case id or golden file image-" in result.stderr.str()


def test_cuda_index_beyond_the_visible_devices_is_a_usage_error(suite, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = suite.run("-k", "coffee", "--device=cuda:3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--device=cuda:3: requested but 2 CUDA device(s) are visible" in result.stderr.str()


def test_bad_option_values_name_where_they_came_from(suite, monkeypatch) -> None:
    monkeypatch.setenv("VITPARITY_SHARD", "eight")
    result = suite.run("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "VITPARITY_SHARD=eight: " in result.stderr.str()
    monkeypatch.delenv("VITPARITY_SHARD")
    monkeypatch.setenv("VITPARITY_NUM_FRAMES", "eight")  # not a variable: CI does not set --num-frames
    assert suite.run("--collect-only", "-q").ret == pytest.ExitCode.OK
    result = suite.run("--threshold=1.5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "--threshold=1.5: must be in (0, 1)" in result.stderr.str()


def test_media_too_small_for_the_card_warn_on_cuda_and_fail_when_required(suite, tmp_path) -> None:
    """The bundled media (largest case 1,632 tokens) are no release gate: --require-representative stops the run;
    a 1400x1400 image (10,000 patches of 14, past the pretraining grid) packed with a small one and a clip sampled at
    4 frames fills 61% of a 16,384-token budget."""
    small = suite.run("--require-representative", "--collect-only", "-q")
    assert small.ret == pytest.ExitCode.USAGE_ERROR
    # The bundled media reach past the pretraining grid (image-astronaut.jpg), another frame count
    # (coffee_tilt@4f.mp4) and a pack of images and videos: only their size is named.
    assert ("--require-representative: the media are not representative of the card: no case reaches 10,000 tokens "
            "(largest: video-chelsea_pan.mp4, 1,632); no pack reaches 50% of its 16,384-token budget (largest: "
            "pack-ba4308ed, 7,148). Add media of your own") in small.stderr.str()
    own = tmp_path / "own"
    own.mkdir()
    cv2.imwrite(str(own / "large.png"), np.zeros((1400, 1400, 3), np.uint8))
    shutil.copy(BUILTIN_MEDIA / "coffee_small.jpg", own / "small.jpg")
    shutil.copy(BUILTIN_MEDIA / "coffee_tilt@4f.mp4", own / "pan@4f.mp4")  # 4 frames, packed with the images
    large = suite.run("--require-representative", "--no-bundled-media", f"--media={own}", "--collect-only", "-q")
    assert large.ret == 0, large.stderr.str()


def test_media_scale_figures_and_when_they_warn() -> None:
    from vitparity.suite.cases import PackGroup, ParityCase
    from vitparity.suite.representative import media_scale, warnings

    groups = (PackGroup("pack-a", (ParityCase("image-a.jpg", "image", Path("a.jpg"), 9_999),
                                   ParityCase("image-b.jpg", "image", Path("b.jpg"), 100)), 16_384),
              PackGroup("pack-b", (ParityCase("video-c.mp4", "video", Path("c.mp4"), 9_000),), 16_384))
    scale = media_scale(groups, 16_384, num_frames=8)
    assert scale.line() == ("largest pack: pack-a 10,099 of 16,384 tokens (61.6% of its budget); largest case: "
                            "image-a.jpg 9,999 tokens (estimated); past the 32-patch pretraining grid: h none, w none; "
                            "video at other than 8 frames: video-c.mp4; at other than the release's 8: video-c.mp4; "
                            "pack of images and videos: none")
    assert scale.problems() == ["no case reaches 10,000 tokens (largest: image-a.jpg, 9,999)",
                                "no case goes past the 32-patch pretraining grid on the h axis (more than 448 px at "
                                "patch 14)",
                                "no case goes past the 32-patch pretraining grid on the w axis (more than 448 px at "
                                "patch 14)", "no pack mixes images and videos"]
    assert warnings(scale, "cpu") == [] and len(warnings(scale, "cuda:0")) == len(scale.problems())
    assert media_scale(groups, 32_768).problems()[1].startswith("no pack reaches 50% of its 32,768-token budget")


def left_out_counts(output: str) -> list[int]:
    """The number of tests of each "not run by the plan (reason): names" line of the summary."""
    counts = []
    for names in re.findall(r"^not run by the plan \(.*?\): (.*)$", output, re.MULTILINE):
        total = re.search(r"\((\d+) in all\)$", names)
        counts.append(int(total.group(1)) if total else len(names.split(", ")))
    return counts
