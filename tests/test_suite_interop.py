"""The suite with checkpoints as users hold them: paths written with a space, hub ids from an offline cache,
config differences that change only numerics, preprocessor normalisation, pinned float32."""

from __future__ import annotations

import json
import shlex
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING
from vitparity.media import decoder_record
from vitparity.pair import PREPROCESSOR_FILE

from conftest import verdicts
from faults import build_variant
from test_hub import COMMITS, REPOS, cache_builtin_models

ONE_CASE = ("-k", "coffee_small and not golden")


def copies(tmp_path: Path) -> tuple[Path, Path]:
    return (Path(shutil.copytree(BUILTIN_HF, tmp_path / "hf model")),
            Path(shutil.copytree(BUILTIN_PACKING, tmp_path / "packing-model")))


def golden_meta(root: Path, case: str, side: str) -> dict:
    path = next(root.rglob(f"test_golden[[]{case}-{side}].npz"))
    with np.load(path) as archive:
        return json.loads(archive["meta"].tobytes().decode("utf-8"))


def test_model_paths_written_with_a_space_run_the_suite(suite) -> None:
    """Inside the repository the spelling works: pytest's rootdir stays the repository's, whose conftest loads the
    suite's plugin and its options before the command line is parsed in full."""
    hf, packing = copies(suite.path)
    result = suite.run("--hf-model", str(hf), "--packing-model", str(packing), *ONE_CASE)
    assert result.ret == 0, result.stdout.str()[-2000:] + result.stderr.str()[-2000:]
    assert f"hf: {hf}  packing: {packing}" in result.stdout.str()
    assert set(verdicts(result.stdout.str()).values()) == {"PASS"}


def test_a_space_that_moves_the_rootdir_says_what_to_type(suite, tmp_path_factory) -> None:
    """Outside it, pytest picks its rootdir from the path before any plugin loads: one line says what to type."""
    hf, packing = copies(tmp_path_factory.mktemp("elsewhere"))
    result = suite.run("--hf-model", str(hf), "--packing-model", str(packing), *ONE_CASE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert f"pytest took {hf}, {packing} for a test path" in line and "(config file: None)" in line
    typed = shlex.split(line.split("type: pytest ", 1)[1])
    assert f"--hf-model={hf}" in typed and f"--packing-model={packing}" in typed
    assert suite.pytester.runpytest_inprocess(*typed).ret == 0


def test_numeric_config_differences_warn_and_fail_only_when_strict(suite, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = build_variant("config_gelu_tanh", tmp_path / "checkpoints")
    lenient = suite.run(f"--packing-model={folder}", "-m", "not golden", "--junitxml=junit.xml")
    assert lenient.ret == 0
    assert "WARNING: config difference hidden_act: hf 'gelu' vs packing 'gelu_pytorch_tanh'" in lenient.stdout.str()
    properties = {p.get("name"): p.get("value") for p in ET.parse(suite.path / "junit.xml").getroot().iter("property")}
    assert "hidden_act" in json.loads(properties["vitparity_config_warnings"])[0]
    strict = suite.run(f"--packing-model={folder}", "-m", "not golden", "--strict-model-config")
    assert strict.ret == pytest.ExitCode.USAGE_ERROR  # known from the config files: one message, no test
    assert "strict config: every difference counts" in strict.stderr.str() and "failed" not in strict.stdout.str()


def test_processors_that_normalise_differently_are_a_usage_error(suite, tmp_path) -> None:
    hf, packing = copies(tmp_path)
    (packing / PREPROCESSOR_FILE).write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    result = suite.run(f"--hf-model={hf}", f"--packing-model={packing}", *ONE_CASE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "normalise their input differently" in err and "[0.5, 0.5, 0.5]" in err and "0.48145466" in err


def test_the_processors_normalisation_is_used_and_recorded(suite, tmp_path) -> None:
    hf, packing = copies(tmp_path)
    processor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "rescale_factor": 1 / 255}
    for folder in (hf, packing):
        (folder / PREPROCESSOR_FILE).write_text(json.dumps(processor))
    result = suite.run(f"--hf-model={hf}", f"--packing-model={packing}", "--golden-dir=goldens",
                       "--regenerate-goldens", "-k", "coffee_small and golden")
    assert result.ret == 0
    meta = golden_meta(suite.path / "goldens", "image-coffee_small.jpg", "packing")
    assert meta["normalization"]["mean"] == [0.5, 0.5, 0.5] and meta["normalization"]["std"] == [0.25, 0.25, 0.25]
    assert meta["tf32"] == "n/a on cpu"
    assert meta["decoder"] == decoder_record()
    # the same media through CLIP normalisation gives other features: the processor's values were used
    clip = suite.run("--golden-dir=goldens", "--regenerate-goldens", "-k", "coffee_small and golden")
    assert clip.ret == 0
    clip_meta = golden_meta(suite.path / "goldens", "image-coffee_small.jpg", "packing")
    assert clip_meta["normalization"]["mean"][0] == pytest.approx(0.48145466)
    with np.load(next((suite.path / "goldens").rglob("test_golden[[]image-coffee_small.jpg-packing].npz"))) as a:
        assert a["norms"].size == 35


def test_hub_ids_from_an_offline_cache_are_recorded_in_goldens(suite, tmp_path, monkeypatch) -> None:
    cache_builtin_models(tmp_path / "hf-home", monkeypatch)
    result = suite.run(f"--hf-model={REPOS['hf']}", f"--packing-model={REPOS['packing']}@v1",
                       "--golden-dir=goldens", "--regenerate-goldens", "-k", "coffee_small")
    assert result.ret == 0, result.stdout.str()[-3000:]
    for side in ("hf", "packing"):
        model = golden_meta(suite.path / "goldens", "image-coffee_small.jpg", side)["model"]
        assert (model["repo_id"], model["commit"]) == (REPOS[side], COMMITS[side])
    assert golden_meta(suite.path / "goldens", "image-coffee_small.jpg", "packing")["model"]["revision"] == "v1"
    missing = suite.run("--hf-model=example-org/absent", *ONE_CASE)  # known before any test: one message
    assert missing.ret == pytest.ExitCode.USAGE_ERROR and "example-org/absent" in missing.stderr.str()
    assert "failed" not in missing.stdout.str()


def test_float32_on_cuda_runs_without_tf32_and_restores_the_flags(suite, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an absent device is a usage error: CUDA "there"

    (suite.path / "parity_tests" / "conftest.py").write_text(
        "import json, pathlib, torch\n"
        "def pytest_collection_finish(session):\n"
        "    flags = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]\n"
        "    pathlib.Path('flags.json').write_text(json.dumps(flags))\n"
    )
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        suite.run("--device=cuda", "--dtype=float32", "--collect-only", *ONE_CASE)
        assert json.loads((suite.path / "flags.json").read_text()) == [False, False]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        suite.run("--device=cuda", "--dtype=bfloat16", "--collect-only", *ONE_CASE)
        assert json.loads((suite.path / "flags.json").read_text()) == [True, True]  # TF32 is about float32 only
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
