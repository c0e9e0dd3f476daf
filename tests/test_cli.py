"""Tests of the vitparity command (extract / verify / convert), run in-process on the built-in tiny models."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.cli import main, resolve_inputs
from vitparity.features_io import HF_FILE, METADATA_FILE, PACKING_FILE, read_features, write_features
from vitparity.junit_report import merge_report, read_junit
from vitparity.media import decoder_record
from vitparity.rules import resolve_device_dtype

from conftest import edited_checkpoint
from faults import build_variant

REPO = Path(__file__).resolve().parent.parent
IMAGE = BUILTIN_MEDIA / "coffee_small.jpg"  # 105x70: 5x7 patches after cropping
VIDEO = BUILTIN_MEDIA / "coffee_zoom.mp4"  # 5 frames of 168x112: 8x12 patches per frame
OTHER_IMAGE = BUILTIN_MEDIA / "rocket_portrait.jpg"
NUM_FRAMES = 2
HIDDEN = 64


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """main() on the arguments; (exit status, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One extraction (one image, one video) shared by the verify tests, which work on copies."""
    folder = tmp_path_factory.mktemp("features") / "out"
    argv = ["extract", "--image1", IMAGE, "--video1", VIDEO, "--num_frames", NUM_FRAMES, "--output_dir", folder]
    assert main([str(arg) for arg in argv]) == 0
    return folder


@pytest.fixture
def copy_dir(features_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the shared features folder."""
    return Path(shutil.copytree(features_dir, tmp_path / "copy"))


def _rewrite(folder: Path, name: str, change) -> None:
    """Apply `change` to the arrays of one npz file of a features folder and save it back."""
    with np.load(folder / name) as data:
        arrays = {key: data[key] for key in data.files}
    change(arrays)
    np.savez(folder / name, **arrays)


def test_extract_writes_features_and_metadata(features_dir: Path) -> None:
    hf, packing, metadata = read_features(features_dir)
    assert sorted(os.listdir(features_dir)) == sorted([HF_FILE, PACKING_FILE, METADATA_FILE])
    tokens = {"image1": 5 * 7, "video1": NUM_FRAMES * 8 * 12}
    assert list(hf) == list(packing) == list(tokens)
    for key, n in tokens.items():
        assert hf[key].dtype == packing[key].dtype == np.float32
        assert hf[key].shape == (1, n, HIDDEN)
        assert packing[key].shape == (n, HIDDEN)
        assert metadata["inputs"][key]["hf_feature_shape"] == [1, n, HIDDEN]
        assert metadata["inputs"][key]["packing_feature_shape"] == [n, HIDDEN]
    assert metadata["hf_model_path"] == str(BUILTIN_HF)
    assert metadata["packing_model_path"] == str(BUILTIN_PACKING)
    assert (metadata["num_frames"], metadata["device"], metadata["dtype"]) == (NUM_FRAMES, "cpu", "float32")
    assert (metadata["align"], metadata["threshold"]) == ("crop", 0.99)
    assert metadata["models"]["hf"]["class_name"] == "OneVisionEncoderModel"
    assert metadata["models"]["packing"]["class_name"] == "OneVisionEncoderPackingModel"
    assert set(metadata["versions"]) == {"vitparity", "torch", "transformers", "numpy", "cv2"}
    assert metadata["decoder"] == decoder_record() and metadata["decoder"]["video_backend"] == "FFMPEG"
    assert metadata["inputs"]["video1"]["codec"] == "FMP4"
    image, video = metadata["inputs"]["image1"], metadata["inputs"]["video1"]
    # width / height: the size the model saw (the release tool's meaning); orig_*: the native size
    assert (image["path"], image["width"], image["height"]) == (str(IMAGE), 98, 70)
    assert (image["orig_width"], image["orig_height"], image["aligned_width"]) == (105, 70, 98)
    assert (metadata["temporal_context"], metadata["strict_buffers"]) == (64, False)
    assert metadata["restored_buffers"] == {"hf": [], "packing": []}
    assert image["grid_thw"] == [1, 5, 7] and image["temporal_positions"] == [0]
    assert (video["path"], video["width"], video["height"], video["orig_width"]) == (str(VIDEO), 168, 112, 168)
    assert (video["total_frames"], video["sampled_frames"], video["frame_indices"]) == (5, 2, [0, 4])
    assert video["fps"] > 0
    assert video["grid_thw"] == [NUM_FRAMES, 8, 12] and video["temporal_positions"] == [0, 63]
    assert video["tensor_shape"] == [1, 3, NUM_FRAMES, 112, 168]


def test_verify_passes_on_extracted_features(features_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "verify", "--features_dir", features_dir)
    assert code == 0, out + err
    assert out.count("PASS") == 2 and "2 passed, 0 failed" in out


def test_verify_fails_on_one_altered_token(copy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays["video1"][17] = -arrays["video1"][17]

    _rewrite(copy_dir, PACKING_FILE, change)
    code, out, _ = _run(capsys, "verify", "--features-dir", copy_dir)
    assert code == 1
    assert "1 passed, 1 failed" in out and "min cosine" in out


def test_verify_fails_on_token_count_mismatch(copy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays["image1"] = arrays["image1"][:-1]

    _rewrite(copy_dir, PACKING_FILE, change)
    code, out, _ = _run(capsys, "verify", "--features_dir", copy_dir)
    assert code == 1
    assert "token count differs: hf 35 vs packing 34" in out


def test_verify_fails_on_nan(copy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays["image1"][0, 3, 5] = np.nan

    _rewrite(copy_dir, HF_FILE, change)
    code, out, _ = _run(capsys, "verify", "--features_dir", copy_dir)
    assert code == 1
    assert "NaN in hf features" in out


@pytest.mark.parametrize("name", [HF_FILE, PACKING_FILE])
def test_verify_fails_on_key_missing_from_one_side(
    copy_dir: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Without a list of inputs in metadata.json, a key on one side only is a failed comparison."""
    metadata = json.loads((copy_dir / METADATA_FILE).read_text())
    del metadata["inputs"]
    (copy_dir / METADATA_FILE).write_text(json.dumps(metadata))
    _rewrite(copy_dir, name, lambda arrays: arrays.pop("video1"))
    code, out, _ = _run(capsys, "verify", "--features_dir", copy_dir)
    assert code == 1
    assert "video1" in out and f"missing from {name}" in out and "1 passed, 1 failed" in out


@pytest.mark.parametrize("change", ["missing from both", "missing from one", "unlisted"])
def test_verify_checks_the_inputs_listed_in_metadata(
    copy_dir: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    if change == "unlisted":
        for name in (HF_FILE, PACKING_FILE):
            _rewrite(copy_dir, name, lambda arrays: arrays.update(image2=arrays["image1"]))
    else:
        for name in (HF_FILE, PACKING_FILE) if change == "missing from both" else (PACKING_FILE,):
            _rewrite(copy_dir, name, lambda arrays: arrays.pop("video1"))
    code, out, err = _run(capsys, "verify", "--features_dir", copy_dir)
    assert code == 2 and out == "" and "Traceback" not in err
    assert METADATA_FILE in err and PACKING_FILE in err
    assert ("image2" if change == "unlisted" else "video1") in err
    assert (HF_FILE in err) == (change != "missing from one")


@pytest.mark.parametrize("threshold", ["-1", "0", "1", "1.5", "nan"])
def test_threshold_out_of_range_is_a_usage_error(
    features_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], threshold: str
) -> None:
    code, out, err = _run(capsys, "verify", "--features_dir", features_dir, "--threshold", threshold)
    assert code == 2 and out == "" and "--threshold" in err
    code, _, err = _run(
        capsys, "extract", "--hf_model_path", tmp_path / "absent", "--packing_model_path", tmp_path / "absent",
        "--image1", IMAGE, "--threshold", threshold, "--output_dir", tmp_path / "o",
    )
    assert code == 2 and "--threshold" in err and "absent" not in err
    assert not (tmp_path / "o").exists()


def test_verify_fails_on_empty_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_features(tmp_path, {}, {}, {})
    code, out, _ = _run(capsys, "verify", "--features_dir", tmp_path)
    assert code == 1 and "no features" in out


@pytest.mark.parametrize("damage", ["no folder", "no metadata", "corrupt npz", "npy instead of npz"])
def test_verify_bad_folder_is_a_usage_error(
    copy_dir: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    target = copy_dir
    if damage == "no folder":
        target = copy_dir / "absent"
    elif damage == "no metadata":
        (copy_dir / METADATA_FILE).unlink()
    elif damage == "corrupt npz":
        (copy_dir / PACKING_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    else:
        np.save(copy_dir / HF_FILE, np.zeros((1, 2, 3), np.float32), allow_pickle=False)
        os.replace(copy_dir / f"{HF_FILE}.npy", copy_dir / HF_FILE)
    code, _, err = _run(capsys, "verify", "--features_dir", target)
    assert code == 2
    assert err.startswith("vitparity: error: ") and "Traceback" not in err
    expected = {"no folder": "absent", "no metadata": METADATA_FILE, "corrupt npz": PACKING_FILE}
    assert expected.get(damage, HF_FILE) in err


def test_images_and_videos_lists_with_dashed_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    out_dir = tmp_path / "out"
    code, out, err = _run(
        capsys, "extract", "--hf-model-path", BUILTIN_HF, "--packing-model-path", BUILTIN_PACKING,
        "--image2", OTHER_IMAGE, "--images", IMAGE, IMAGE, "--videos", VIDEO,
        "--num-frames", 1, "--output-dir", out_dir, "--dtype", "float32", "--device", "cpu", "--align", "pad",
    )
    assert code == 0, out + err
    hf, packing, metadata = read_features(out_dir)
    assert list(hf) == list(packing) == ["image1", "image2", "image3", "video1"]
    assert [metadata["inputs"][key]["path"] for key in hf] == [str(IMAGE), str(OTHER_IMAGE), str(IMAGE), str(VIDEO)]
    assert packing["image1"].shape == packing["image3"].shape == (5 * 8, HIDDEN)  # 105x70 padded to 112x70
    assert packing["video1"].shape == (8 * 12, HIDDEN)
    assert "loading HF model" in err and "loading packing model" in err and "[4/4] video1 coffee_zoom.mp4: 96 tokens" in err
    assert "4 passed, 0 failed" in out


def test_quiet_when_stderr_is_not_a_terminal(features_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "verify", "--features_dir", features_dir)
    assert code == 0 and err == ""


def _namespace(**given: object) -> argparse.Namespace:
    fields = dict(root=None, image1=None, image2=None, video1=None, video2=None, images=[], videos=[])
    return argparse.Namespace(**{**fields, **given})


def test_resolve_inputs_slots() -> None:
    inputs = resolve_inputs(_namespace(image2="b.jpg", images=["a.jpg", "c.jpg"], video2="v.mp4"))
    assert inputs == {
        "image1": ("image", "a.jpg"),
        "image2": ("image", "b.jpg"),
        "image3": ("image", "c.jpg"),
        "video2": ("video", "v.mp4"),
    }
    rooted = resolve_inputs(_namespace(root="r", image2="x.jpg", videos=["w.mp4"]))
    assert rooted == {
        "image1": ("image", str(Path("r/1.jpg"))),
        "image2": ("image", "x.jpg"),
        "video1": ("video", str(Path("r/1.mp4"))),
        "video2": ("video", str(Path("r/2.mp4"))),
        "video3": ("video", "w.mp4"),
    }


def test_no_inputs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "extract", "--output_dir", tmp_path / "out")
    assert code == 2 and "no inputs" in err
    assert not (tmp_path / "out").exists()


def test_root_with_missing_default_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name, source in (("1.jpg", IMAGE), ("2.jpg", IMAGE), ("1.mp4", VIDEO)):
        shutil.copy(source, root / name)
    code, _, err = _run(capsys, "extract", "--root", root, "--output_dir", tmp_path / "out")
    assert code == 2
    assert str(root / "2.mp4") in err and "not found" in err
    assert not (tmp_path / "out").exists()


def _bad_input(tmp_path: Path, case: str) -> tuple[str, Path]:
    """(flag, path) of a broken input file."""
    if case == "missing image":
        return "--image1", tmp_path / "absent.jpg"
    if case == "text as image":
        path = tmp_path / "notes.jpg"
        path.write_text("not an image\n")
        return "--image1", path
    if case == "video as image":
        return "--image1", VIDEO
    if case == "corrupt video":
        path = tmp_path / "corrupt.mp4"
        path.write_bytes(bytes(range(256)) * 16)
        return "--video1", path
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    return "--video1", path


@pytest.mark.parametrize("case", ["missing image", "text as image", "video as image", "corrupt video", "empty video"])
def test_bad_input_fails_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    flag, path = _bad_input(tmp_path, case)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = _run(capsys, "extract", "--image2", IMAGE, flag, path, "--output_dir", out_dir)
    assert code == 2
    assert err.startswith("vitparity: error: ") and str(path) in err and "Traceback" not in err
    assert out == "" and list(out_dir.iterdir()) == []


def test_float16_on_cpu_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys, "extract", "--image1", IMAGE, "--device", "cpu", "--dtype", "float16", "--output_dir", tmp_path / "o"
    )
    assert code == 2 and "unsupported dtype on CPU" in err
    assert not (tmp_path / "o").exists()


def test_swapped_model_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys, "extract", "--hf_model_path", BUILTIN_PACKING, "--packing_model_path", BUILTIN_HF,
        "--image1", IMAGE, "--output_dir", tmp_path / "o",
    )
    assert code == 2 and "given as the hf model but it is a packing model" in err
    assert not (tmp_path / "o").exists()


def test_architecture_mismatch_lists_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    packing = edited_checkpoint(BUILTIN_PACKING, tmp_path / "packing", layer_norm_eps=1e-5, rope_theta=500.0)
    code, _, err = _run(
        capsys, "extract", "--hf_model_path", BUILTIN_HF, "--packing_model_path", packing,
        "--image1", IMAGE, "--output_dir", tmp_path / "o",
    )
    assert code == 2 and "do not describe the same model" in err
    assert "rope_theta" in err and "hidden_size" not in err
    assert "layer_norm_eps" not in err  # numerics only: a warning, not the cause of the error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("strict_flag", ["--strict-model-config", "--strict_config", "--strict-config"])
def test_numeric_config_differences_warn_and_fail_when_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], strict_flag: str
) -> None:
    """A packing config with a tanh GELU and another norm epsilon passes with warnings; strict mode refuses it."""
    packing = edited_checkpoint(BUILTIN_PACKING, tmp_path / "packing", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5)
    argv = ["extract", "--hf_model_path", BUILTIN_HF, "--packing_model_path", packing, "--image1", IMAGE]
    code, out, err = _run(capsys, *argv, "--output_dir", tmp_path / "o")
    assert code == 0, out + err
    warnings = [line for line in out.splitlines() if line.startswith("WARNING: config difference")]
    assert len(warnings) == 2
    assert "hidden_act: hf 'gelu' vs packing 'gelu_pytorch_tanh'" in warnings[0]
    assert "layer_norm_eps: hf 1e-06 vs packing 1e-05" in warnings[1]
    metadata = read_features(tmp_path / "o")[2]
    assert len(metadata["config_warnings"]) == 2 and metadata["strict_config"] is False
    hf, packing_features, _ = read_features(tmp_path / "o")
    assert not np.array_equal(hf["image1"][0], packing_features["image1"])  # the planted change reached the features
    code, out, err = _run(capsys, "verify", "--features_dir", tmp_path / "o")
    assert code == 0 and out.count("WARNING: config difference") == 2
    code, out, err = _run(capsys, *argv, strict_flag, "--output_dir", tmp_path / "strict")
    assert code == 2 and out == "" and "strict config: every difference counts" in err
    assert "hidden_act" in err and "layer_norm_eps" in err
    assert not (tmp_path / "strict").exists()


def _write_processor(folder: Path, **fields: object) -> None:
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 448},
                 "do_center_crop": True, "crop_size": 448, "rescale_factor": 1 / 255, **fields}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


def test_preprocessor_normalization_is_used_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = Path(shutil.copytree(BUILTIN_HF, tmp_path / "hf"))
    packing = Path(shutil.copytree(BUILTIN_PACKING, tmp_path / "packing"))
    for folder in (hf, packing):
        _write_processor(folder, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    argv = ["extract", "--image1", IMAGE, "--video1", VIDEO, "--num_frames", NUM_FRAMES]
    code, out, err = _run(capsys, *argv, "--hf_model_path", hf, "--packing_model_path", packing,
                          "--output_dir", tmp_path / "o")
    assert code == 0, out + err
    features, _, metadata = read_features(tmp_path / "o")
    assert metadata["normalization"]["mean"] == metadata["normalization"]["std"] == [0.5, 0.5, 0.5]
    assert metadata["normalization"]["rescale"] == 1 / 255
    assert str(hf / "preprocessor_config.json") in metadata["normalization"]["source"]
    clip = read_features(_clip_features(capsys, tmp_path, argv))[0]
    assert features["image1"].shape == clip["image1"].shape  # native resolution: no resize, no crop
    assert not np.allclose(features["image1"], clip["image1"], atol=1e-3)


def _clip_features(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list) -> Path:
    """The same extraction on the built-in models (no preprocessor_config.json: CLIP defaults)."""
    code, out, err = _run(capsys, *argv, "--output_dir", tmp_path / "clip")
    assert code == 0, out + err
    assert read_features(tmp_path / "clip")[2]["normalization"]["source"] == "CLIP defaults"
    return tmp_path / "clip"


def test_disagreeing_preprocessors_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    packing = Path(shutil.copytree(BUILTIN_PACKING, tmp_path / "packing"))
    _write_processor(packing, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    code, out, err = _run(
        capsys, "extract", "--hf_model_path", BUILTIN_HF, "--packing_model_path", packing,
        "--image1", IMAGE, "--output_dir", tmp_path / "o",
    )
    assert code == 2 and out == "" and "normalise their input differently" in err
    assert "0.48145466" in err and "[0.5, 0.5, 0.5]" in err and "CLIP defaults" in err
    assert str(packing / "preprocessor_config.json") in err
    assert not (tmp_path / "o").exists()


def test_seed_metadata_and_verify_blocks(features_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a script written against the seed tools reads: the features map, per-input shapes, verify's blocks."""
    metadata = json.loads((features_dir / METADATA_FILE).read_text())
    image_tokens, video_tokens = 5 * 7, NUM_FRAMES * 8 * 12
    assert metadata["features"] == {
        "hf": {"image1": [1, image_tokens, HIDDEN], "video1": [1, video_tokens, HIDDEN]},
        "packing": {"image1": [image_tokens, HIDDEN], "video1": [video_tokens, HIDDEN]},
    }
    assert metadata["inputs"]["image1"]["shape"] == [1, 3, 70, 98]
    assert metadata["inputs"]["video1"]["shape"] == [1, 3, NUM_FRAMES, 112, 168]
    assert metadata["tf32"] == "n/a on cpu"
    code, out, _ = _run(capsys, "verify", "--features_dir", features_dir)
    assert code == 0
    expected = [
        "Metadata", f"  HF model: {BUILTIN_HF}", f"  Packing model: {BUILTIN_PACKING}", "  Device: cpu",
        f"  Num frames: {NUM_FRAMES}", "Inputs", f"  image1: {IMAGE}", "    Resolution: 98x70 (native 105x70)",
        f"  video1: {VIDEO}", "    Resolution: 168x112", f"    Frames: {NUM_FRAMES}/5",
    ]
    assert out.splitlines()[: len(expected)] == expected
    assert out.index("Frames:") < out.index("[1] image1")



def test_verify_says_when_sampled_frames_repeat() -> None:
    """8 frames sampled from a 5-frame clip: the line says the frames repeat; 2 of 5 needs no word."""
    from vitparity.features_io import describe_metadata

    def frames(sampled: int, total: int) -> str:
        item = {"path": "clip.mp4", "sampled_frames": sampled, "total_frames": total}
        return next(line for line in describe_metadata({"inputs": {"video1": item}}) if "Frames:" in line)

    assert frames(8, 5) == "    Frames: 8/5 (the clip has 5 frames: sampled frames repeat)"
    assert frames(2, 5) == "    Frames: 2/5"


@pytest.mark.parametrize("key", ["head.probe", "encoder.layers.3.mlp.fc2.weight"])
def test_non_finite_weights_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    """A NaN where the penultimate features cannot see it (head, last layer) still stops extract."""
    hf = Path(shutil.copytree(BUILTIN_HF, tmp_path / "hf"))
    state = load_file(str(hf / "model.safetensors"))
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    code, out, err = _run(
        capsys, "extract", "--hf_model_path", hf, "--packing_model_path", BUILTIN_PACKING,
        "--image1", IMAGE, "--output_dir", tmp_path / "o",
    )
    assert code == 2 and out == ""
    assert str(hf) in err and key in err and "NaN or Inf" in err
    assert not (tmp_path / "o").exists()


def test_num_frames_beyond_rope_temporal_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("media decoded before --num_frames was checked")

    monkeypatch.setattr("vitparity.media_check.check_media", no_decoding)  # imported by extract when it runs
    code, _, err = _run(capsys, "extract", "--video1", VIDEO, "--num_frames", 65, "--output_dir", tmp_path / "o")
    assert code == 2 and "--num_frames=65" in err and "rope_temporal_size=64" in err
    assert not (tmp_path / "o").exists()


def test_num_frames_unlimited_without_rope_temporal_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = Path(shutil.copytree(BUILTIN_HF, tmp_path / "hf"))
    config = json.loads((hf / "config.json").read_text())
    config["rope_temporal_size"] = None
    (hf / "config.json").write_text(json.dumps(config))
    code, out, err = _run(
        capsys, "extract", "--hf_model_path", hf, "--packing_model_path", BUILTIN_PACKING,
        "--video1", VIDEO, "--num_frames", 65, "--output_dir", tmp_path / "o",
    )
    assert code == 0, out + err
    assert "1 passed, 0 failed" in out


def test_cuda_device_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device_dtype("cuda:1", "auto") == ("cuda:1", "bfloat16")
    code, _, err = _run(capsys, "extract", "--image1", IMAGE, "--device", "cuda:2", "--output_dir", tmp_path / "o")
    assert code == 2 and "--device=cuda:2: requested but 2 CUDA device" in err
    code, _, err = _run(capsys, "extract", "--image1", IMAGE, "--device", "gpu", "--output_dir", tmp_path / "o")
    assert code == 2 and "--device" in err and "cuda:N" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_output_dir_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("model loaded before --output_dir was checked")

    monkeypatch.setattr("vitparity.pair.load_model", no_loading)
    existing = tmp_path / "features"
    existing.write_text("not a folder\n")
    output = existing if where == "file" else existing / "sub"
    code, out, err = _run(capsys, "extract", "--image1", IMAGE, "--output_dir", output)
    assert code == 2 and out == "" and "--output_dir" in err and str(existing) in err
    assert existing.read_text() == "not a folder\n"


def test_write_features_is_atomic(tmp_path: Path) -> None:
    features = {"image1": np.ones((3, 4), np.float32)}
    write_features(tmp_path, {"image1": features["image1"][None]}, features, {"note": "first"})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(TypeError):
        write_features(tmp_path, {"image1": np.zeros((1, 3, 4))}, features, {"unserialisable": {1, 2}})
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    with pytest.raises(ValueError, match="feature keys differ"):
        write_features(tmp_path, {"image1": features["image1"][None]}, {}, {})


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    features = {"image1": np.ones((3, 4), np.float32)}
    old = os.umask(0o022)
    try:
        write_features(tmp_path, {"image1": features["image1"][None]}, features, {})
    finally:
        os.umask(old)
    assert {name: (tmp_path / name).stat().st_mode & 0o777 for name in os.listdir(tmp_path)} == {
        name: 0o644 for name in (HF_FILE, PACKING_FILE, METADATA_FILE)
    }


def test_convert_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "convert", BUILTIN_HF, tmp_path / "packing")
    assert code == 0, err
    assert "wrote" in out and "model.safetensors" in out
    converted = load_file(str(tmp_path / "packing" / "model.safetensors"))
    committed = load_file(str(BUILTIN_PACKING / "model.safetensors"))
    assert converted.keys() == committed.keys()
    assert all(torch.equal(converted[key], committed[key]) for key in committed)
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "packing").iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "preprocessor_config.json"], 0o666 & ~umask)
    processor = json.loads((tmp_path / "packing" / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"]) == ([0.48145466, 0.4578275, 0.40821073],
                                                                 [0.26862954, 0.26130258, 0.27577711])
    assert processor["rescale_factor"] == 1 / 255 and not processor["do_resize"] and not processor["do_center_crop"]
    assert _run(capsys, "convert", tmp_path / "packing", tmp_path / "hf")[0] == 0
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = load_file(str(BUILTIN_HF / "model.safetensors"))
    assert back.keys() == original.keys() and all(torch.equal(back[key], original[key]) for key in original)


def test_convert_help_describes_each_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert re.search(r"SOURCE_DIR\s+checkpoint folder to convert", help_text)
    assert re.search(r"OUT_DIR\s+new or empty folder for the other layout", help_text)


def test_convert_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "convert", tmp_path / "absent", tmp_path / "out")
    assert code == 2 and err.startswith("vitparity: error: ") and str(tmp_path / "absent") in err
    code, _, err = _run(capsys, "convert", BUILTIN_HF, BUILTIN_HF)
    assert code == 2 and "must differ" in err


def test_convert_refuses_an_output_folder_with_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    output.mkdir()
    stale = {"model-00001-of-00002.safetensors": b"old", "model.safetensors.index.json": b"{}"}
    for name, data in stale.items():
        (output / name).write_bytes(data)
    code, out, err = _run(capsys, "convert", BUILTIN_HF, output)
    assert code == 2 and out == "" and str(output) in err and "model.safetensors.index.json" in err
    assert {path.name: path.read_bytes() for path in output.iterdir()} == stale


def test_python_dash_m(features_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "vitparity", "verify", "--features-dir", str(features_dir)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Summary: 2 inputs, 2 passed, 0 failed" in result.stdout


# ---------------------------------------------------------------- per-layer trace


def test_extract_trace_layers_stores_the_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "traced"
    code, stdout, _ = _run(capsys, "extract", "--image1", IMAGE, "--video1", VIDEO, "--num_frames", NUM_FRAMES,
                           "--output_dir", out, "--trace-layers")
    assert code == 0, stdout
    _, _, metadata = read_features(out)
    for key in ("image1", "video1"):
        trace = metadata["inputs"][key]["layer_trace"]
        assert (trace["name"], trace["first_divergence"], trace["patterns"]) == (key, None, [])
        assert (trace["hf_count"], trace["packing_count"], trace["dtype"], trace["device"]) == (5, 5, "float32", "cpu")
        assert [layer["index"] for layer in trace["layers"]] == [0, 1, 2, 3, 4]
        assert all(layer["min_cos"] > 0.99 and layer["passed"] for layer in trace["layers"])
    assert "first divergence" not in stdout  # every input passed: nothing to trace in the report


def test_extract_without_trace_layers_stores_no_trace(features_dir: Path) -> None:
    _, _, metadata = read_features(features_dir)
    assert all("layer_trace" not in entry for entry in metadata["inputs"].values())


def _qk_swapped_packing(root: Path) -> Path:
    """The built-in packing checkpoint with q and k swapped (a weight fault: no checkpoint code to trust)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from faults import build_variant
    finally:
        sys.path.remove(str(REPO / "tests"))
    return build_variant("qk_swapped", root)


def test_verify_prints_the_trace_of_failing_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    packing = _qk_swapped_packing(tmp_path / "checkpoints")
    traced, plain = tmp_path / "traced", tmp_path / "plain"
    common = ["extract", "--hf_model_path", BUILTIN_HF, "--packing_model_path", packing, "--image1", IMAGE,
              "--video1", VIDEO, "--num_frames", NUM_FRAMES]
    code, stdout, _ = _run(capsys, *common, "--output_dir", traced, "--trace_layers")
    assert code == 1
    assert stdout.count("\nfirst divergence: layer 1, q after projection (its input equal): q and k exchanged (one side's q is the other's k)\n") == 2, stdout
    assert "per-layer trace of image1" in stdout and "per-layer trace of video1" in stdout
    code, again, _ = _run(capsys, "verify", "--features_dir", traced)
    assert code == 1 and again.count("\nfirst divergence: layer 1, q after projection (its input equal): q and k exchanged (one side's q is the other's k)\n") == 2
    code, stdout, _ = _run(capsys, *common, "--output_dir", plain)
    assert code == 1 and "first divergence" not in stdout


def test_verify_refuses_a_malformed_trace(copy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rewrite(copy_dir, PACKING_FILE, lambda arrays: arrays.update(image1=-arrays["image1"]))
    metadata = json.loads((copy_dir / METADATA_FILE).read_text())
    metadata["inputs"]["image1"]["layer_trace"] = {"name": "image1"}
    (copy_dir / METADATA_FILE).write_text(json.dumps(metadata))
    code, _, err = _run(capsys, "verify", "--features_dir", copy_dir)
    assert code == 2 and "malformed layer trace record (KeyError: 'layers')" in err


# report-junit: the JUnit XML of real suite runs (two shards) merged into one Markdown parity report.

SHARD_ARGS = ("--pack-tokens=1000",)  # 8 built-in cases in groups that both of two shards get some of


@pytest.fixture
def shard_junit(suite) -> list[Path]:
    """JUnit files of `--shard=1/2` and `--shard=2/2` of the suite on the built-in pair (both pass)."""
    paths = []
    for index in (1, 2):
        path = suite.path / f"junit-{index}.xml"
        result = suite.run(f"--shard={index}/2", *SHARD_ARGS, f"--junitxml={path}")
        assert result.ret == 0, result.stdout.str()[-3000:]
        paths.append(path)
    return paths


def _table_cases(markdown: str) -> list[str]:
    return [line.split("|")[1].strip() for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| case ")]


def test_report_junit_merges_shards(shard_junit: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "report-junit", *shard_junit)
    assert code == 0, out + err
    assert out.startswith("## vitparity parity report\n\nPASS: ")
    cases = _table_cases(out)
    files = [p for p in BUILTIN_MEDIA.iterdir() if p.suffix in (".jpg", ".png", ".mp4")]
    media = sorted(f"{'video' if p.suffix == '.mp4' else 'image'}-{p.name}" for p in files)
    codec = sorted(f"codec-{p.name}" for p in files if p.suffix == ".mp4")  # each video's codec-style case
    every = media + codec
    outputs = [f"{name}/{m}" for m in every for name in ("last_hidden_state", "pooler_output")]
    # explicit positions (test_input_paths): each video and codec-style case against the context call and packing
    paths = [f"pos~{to}/{m}" for m in every if not m.startswith("image-") for to in ("ctx", "packing")]
    # token order (test_token_order): the run's smallest codec-style case, on its three paths, in the shard that
    # holds it (the same checks whatever the shards)
    shard_cases = []
    tokens: dict[str, int] = {}
    for p in shard_junit:
        shard_out = merge_report([read_junit(p)])[0]
        shard_cases.append(set(_table_cases(shard_out)))
        tokens.update({line.split("|")[1].strip(): int(line.split("|")[2]) for line in shard_out.splitlines()
                       if line.startswith("| codec-")})
    order_cases = [min(tokens, key=lambda case: (tokens[case], case))]
    order = [f"order~{path}/{m}" for m in order_cases for path in ("sparse", "mosaic", "packing")]
    assert sum(any(row.startswith("order~") for row in rows) for rows in shard_cases) == 1
    # each case's row of an hf batch (test_batch); each image and video of a pack called grid_thw only
    batch = [f"batch/{m}" for m in every]
    grid = [f"grid/{m}" for m in media]
    # every case once, from both shards
    assert sorted(cases) == sorted(every + [f"packed/{m}" for m in every] + outputs + paths + order + batch + grid)
    assert all(shard_cases) and not shard_cases[0] & shard_cases[1]
    assert f"{len(cases)} comparisons, {len(cases)} passed, 0 failed." in out
    for path in shard_junit:
        assert re.search(rf"^- {path.name} main: forwards: hf \d+ \(\d+ tokens\), packing \d+ \(\d+ tokens\); "
                         r"forward tokens: \d+\.\d\dx the one-pass minimum \(each case and input path once\); "
                         r"model loads: hf 1, packing 1", out, re.M)
    # hf forwards: each case alone and its determinism re-run, the explicit-positions call of each video and
    # codec-style case, the two hf paths of each token-order case, and one batch per case (no two bundled cases of a
    # pack group share a shape: each is batched with its own flipped pixels)
    hf_forwards = 2 * len(every) + len(paths) // 2 + 2 * len(order_cases) + len(batch)
    assert re.search(rf"^- total: forwards: hf {hf_forwards} \(\d+ tokens\)", out, re.M), out
    assert "Failed tests" not in out


def test_report_junit_fails_on_a_shard_run_twice(shard_junit: list[Path], capsys) -> None:
    code, out, _ = _run(capsys, "report-junit", *shard_junit, shard_junit[1])
    assert code == 1 and out.splitlines()[2].startswith("FAIL: ")
    assert "Tests run in more than one file" in out and "junit-2.xml, junit-2.xml" in out


def test_report_junit_fails_and_lists_failed_tests(suite, tmp_path: Path, capsys, monkeypatch) -> None:
    """A real failing run (a media file that cannot be decoded, broken after the run checked its media): exit 1, its
    tests listed with their message."""
    monkeypatch.setattr("vitparity.suite.media_preflight.check_run_media", lambda *args: None)
    media = tmp_path / "media"
    media.mkdir()
    (media / "broken.mp4").write_bytes(b"not a video")
    path = suite.path / "junit-broken.xml"
    result = suite.run("-m", "not golden", f"--media={media}", f"--junitxml={path}")
    assert result.ret == 1
    code, out, _ = _run(capsys, "report-junit", path)
    assert code == 1 and "\nFAIL: " in out
    failed = re.findall(r"^- `(\S+)` \((failed|error), junit-broken\.xml\): (.*)$", out, re.M)
    # the video case and its codec-style case both fail (the same unreadable file)
    assert failed and all(re.search(r"\[(video|codec)-broken\.mp4\]$", test_id) for test_id, _, _ in failed)
    assert {re.search(r"\[(\w+)-broken", test_id).group(1) for test_id, _, _ in failed} == {"video", "codec"}
    assert all("broken.mp4" in message for _, _, message in failed)
    assert "| video-astronaut_pan.mp4 |" in out  # the other cases' rows are still there


def test_report_junit_carries_the_verdict(suite, isolated, tmp_path: Path, capsys) -> None:
    """A real failing run against the previous release's goldens: the report names the models and the code, puts
    the worst case first, gives each failed parity test its worst cosine and first divergence, and the drift."""
    packing = build_variant("attention_scale", tmp_path / "checkpoints")  # parity fails from layer 1 on
    path = suite.path / "junit-verdict.xml"
    result = suite.run("-k", "coffee", f"--packing-model={packing}", "--trust-remote-code", "--report-dir=report",
                       f"--golden-baseline={suite.golden_root}", "--baseline-min-cos=0.9", f"--junitxml={path}")
    assert result.ret == 1
    code, out, _ = _run(capsys, "report-junit", path)
    assert code == 1
    head = out.split("| case |", 1)[0]
    # the worst comparison of the run: a case's features, or a whole output of it (last_hidden_state/...)
    assert re.search(r"^worst case: (?:(?:last_hidden_state|pooler_output|packed)/)?(image|video|codec)-coffee_\S+ "
                     r"FAIL, min cos 0\.\d{6}", head, re.M), head
    assert re.search(r"^largest baseline drift: packing/\S+ min cos -?\d\.\d{6}", head, re.M), head
    assert f"packing `{packing}`" in head and "model code: the checkpoints' own (--trust-remote-code)" in head
    assert "largest pack: pack-" in head and "of its budget" in head
    parity = re.findall(r"^- `parity_tests\.test_parity::test_parity\[(\S+)\]` \(failed, junit-verdict\.xml\): .*"
                        r"\(worst cos (\d\.\d{6}) \(\S+\); first divergence: \S+: layer 1, attention \(q, k, v equal; the "
                        r"output before the projection differs\): softmax scale 1/head_dim instead of head_dim\*\*-0\.5 "
                        r"\(packing\)\)$", out, re.M)
    # one per coffee case: each image, each video and each video's codec-style case; the worst first
    coffee = [p for p in BUILTIN_MEDIA.iterdir() if "coffee" in p.name]
    assert sorted(case for case, _ in parity) == sorted(
        [f"image-{p.name}" for p in coffee if p.suffix == ".jpg"]
        + [f"{kind}-{p.name}" for p in coffee if p.suffix == ".mp4" for kind in ("video", "codec")]), out
    assert [float(cos) for _, cos in parity] == sorted(float(cos) for _, cos in parity), out
    drift = out.split("### Baseline drift", 1)[1]
    assert "| packing |" in drift and "| hf |" in drift and "FAIL (min cos > 0.9)" in drift
    assert drift.index("| packing |") < drift.index("| hf |")  # the packing model drifted, the hf did not


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("<html></html>", "root element <html>"),
    ("<testsuites><testsuite>", "not readable as JUnit XML"),
])
def test_report_junit_bad_files_are_named(tmp_path: Path, capsys, content: str | None, words: str) -> None:
    path = tmp_path / "junit.xml"
    if content is not None:
        path.write_text(content)
    code, out, err = _run(capsys, "report-junit", path)
    assert code == 2 and not out
    assert err.startswith(f"vitparity: error: {path}: ") and words in err


def test_report_junit_lists_config_differences(suite, tmp_path: Path, capsys) -> None:
    """A real run whose packing config differs in hidden_act only: the report carries the suite's warning."""
    packing = edited_checkpoint(BUILTIN_PACKING, tmp_path / "packing", hidden_act="gelu_pytorch_tanh")
    path = suite.path / "junit-warned.xml"
    result = suite.run(f"--packing-model={packing}", "-k", "coffee_small and not golden", f"--junitxml={path}")
    assert result.ret == 0, result.stdout.str()[-3000:]
    code, out, _ = _run(capsys, "report-junit", path)
    assert code == 0
    section = out.split("### Config differences (1)\n\n", 1)[1]
    assert section.startswith("- ") and "hidden_act" in section.splitlines()[0]


def test_verify_judges_the_precision_bars_of_the_folder_dtype(copy_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Doubled packing features keep a cosine of 1 and fail the float32 magnitude bar; `off` turns the bar off; a bad
    limit is a usage error naming the option (the suite's rule, vitparity.precision.parse_bar)."""
    _rewrite(copy_dir, PACKING_FILE, lambda arrays: arrays.update({key: 2 * value for key, value in arrays.items()}))
    code, out, _ = _run(capsys, "verify", "--features_dir", copy_dir)
    assert code == 1 and "precision float32 bars: mean 1-cos <= 3.5e-06, norm gap <= 0.002" in out
    assert "FAIL: norm gap 1.000e+00 > 0.002 (float32 magnitude bar)" in out and "cosine per token: min 1.000000" in out
    code, out, _ = _run(capsys, "verify", "--features_dir", copy_dir, "--max-norm-gap", "off")
    assert code == 0, out
    code, out, err = _run(capsys, "verify", "--features_dir", copy_dir, "--max_cos_gap", "0")
    assert code == 2 and out == "" and "--max_cos_gap=0: a limit must be a finite number > 0" in err
