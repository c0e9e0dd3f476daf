"""The parity suite catches every planted fault and passes every benign variant, in float32 and bfloat16 on CPU.

Each variant (tests/faults) is built as a checkpoint folder in tmp_path and the repository's parity suite
(parity_tests/, via the plugin) runs against it in process, end to end: loading by path with
--trust-remote-code, extraction, parity, packed-batch and golden tests. Goldens are read from a copy of
fixtures/golden and heat maps go to tmp_path, so nothing is written into the repository.

Each variant runs under the CPU's default plan and under the GPU's plan (`--determinism=sample
--companions=sample`). Run with -s to see the detection table of each run; VITPARITY_FAULTS_OUT=DIR also writes one
JSON record per run into DIR (the GPU plan's into DIR/gpu-plan), rendered by `python -m tests.faults.detection DIR`
(docs/detection.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from faults import CONFIG_VARIANTS, VARIANTS, build_variant, builtin_folder, suite_args
from faults.detection import detection_from_reports, format_text_table, group_of
from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA
from vitparity.cli import main
from vitparity.features_io import read_features
from vitparity.loading import ModelLoadError, load_model
from vitparity.pair import PairError, load_pair
from vitparity.snapshots import model_fingerprint

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16")
# The CPU's default plan, and the GPU's (sampled determinism re-runs and a companion-swap probe per group, packing
# features taken from the packs) run on the CPU: each must catch every fault and pass every benign variant.
PLANS = {"cpu-plan": (), "gpu-plan": ("--determinism=sample", "--companions=sample")}
# Benign variants that change nothing in a float32 run (RoPE and attention in float32 either way): may be bit-equal.
BIT_EQUAL_IN_FLOAT32 = {("rope_input_dtype", "float32"), ("attention_fp32", "float32")}


@pytest.fixture(scope="session")
def golden_copy(tmp_path_factory) -> Path:
    """A private copy of the committed goldens: the runs can read them but never write into the repository."""
    folder = tmp_path_factory.mktemp("goldens") / "golden"
    shutil.copytree(REPO / "fixtures" / "golden", folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The forward passes are tiny; several torch threads on a busy or shared CPU (or under -n) are far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_suite_verdict_on_variant(variant, dtype, plan, request, pytester, tmp_path, golden_copy) -> None:
    out_dir = os.environ.get("VITPARITY_FAULTS_OUT")  # read before `isolated` clears VITPARITY_*
    request.getfixturevalue("isolated")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")]:  # the run below is one process, not a worker
        monkeypatch.delenv(name)
    folder = build_variant(variant, tmp_path / "checkpoints")
    goldens_before = _tree(golden_copy)

    start = time.perf_counter()
    result = pytester.runpytest_inprocess(
        str(REPO / "parity_tests"), "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
        "-p", "no:cacheprovider", "-q",
        *suite_args(variant, folder, dtype, golden_dir=golden_copy, report_dir=tmp_path / "report"), *PLANS[plan],
    )
    seconds = time.perf_counter() - start
    detection = detection_from_reports(
        variant, dtype, result.ret, result.reprec.getreports("pytest_runtest_logreport"),
        result.reprec.getreports("pytest_collectreport"), seconds,
    )
    print(f"\n{variant.kind} {variant.name} ({variant.side} side, {variant.mechanism}): {variant.description}")
    print(format_text_table([detection]))
    if detection.failed:
        heat_maps = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
        print("failed: " + " ".join(detection.failed))
        print(f"heat maps written: {len(heat_maps)}")
    if out_dir:
        records = Path(out_dir) if plan == "cpu-plan" else Path(out_dir) / plan  # one table per plan
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{variant.name}-{dtype}.json").write_text(detection.to_json() + "\n")

    assert _tree(golden_copy) == goldens_before, "a suite run wrote into the golden folder"
    assert detection.ran, f"the suite did not run (exit {result.ret}):\n{result.stdout.str()[-4000:]}"
    assert not detection.errors, "the suite crashed instead of giving verdicts:\n" + "\n".join(detection.errors[:10])
    assert str(folder) in result.stdout.str(), "the suite's summary does not name the variant's checkpoint"
    if variant.kind == "fault":
        assert detection.failed, f"fault {variant.name} went undetected in {dtype}:\n{result.stdout.str()[-4000:]}"
        failed_groups = {group_of(test_id) for test_id in detection.failed}
        missed = [group for group in variant.caught_by if group not in failed_groups]
        assert not missed, f"{variant.name} in {dtype}: {missed} did not fail (failed: {detection.failed_groups()})"
    else:
        assert not detection.failed and not detection.skipped, (
            f"false alarm on benign {variant.name} in {dtype}:\n{result.stdout.str()[-6000:]}"
        )
        if (variant.name, dtype) not in BIT_EQUAL_IN_FLOAT32:
            assert detection.parity_max_abs, f"benign {variant.name} changed no feature: was it planted?"
        for name, _ in variant.config:  # a config difference that parity accepts is still reported
            assert f"WARNING: config difference {name}:" in result.stdout.str()


def test_variants_run_their_own_code(isolated, tmp_path) -> None:
    """Every code variant loads as its planted class (not the project's) and only with trust_remote_code."""
    for variant in VARIANTS:
        folder = build_variant(variant, tmp_path)
        loaded = load_model(folder, trust_remote_code=True)
        if variant.mechanism == "code":
            assert loaded.source == "remote code" and loaded.class_name.startswith("Planted"), loaded.describe()
            assert loaded.model.planted_variant == variant.name
        else:
            assert loaded.source == "vitparity", loaded.describe()
        assert loaded.side == variant.side
        if variant.mechanism == "code":
            with pytest.raises(ModelLoadError, match="--own-classes"):  # never the project's class silently
                load_model(folder)
        plain = load_model(folder, own_classes=True)  # asked for: the project's own class on the same weights
        assert plain.source == "vitparity" and not plain.class_name.startswith("Planted")


def test_code_variants_keep_the_golden_fingerprint(tmp_path) -> None:
    """Code variants change no architecture field and no weight byte, so the committed goldens apply to them."""
    for variant in VARIANTS:
        folder = build_variant(variant, tmp_path)
        reference = builtin_folder(variant.side)
        same = model_fingerprint(folder, json.loads((folder / "config.json").read_text())) == model_fingerprint(
            reference, json.loads((reference / "config.json").read_text())
        )
        assert same == (variant.mechanism == "code"), variant.name  # config variants: every architecture field hashed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", CONFIG_VARIANTS, ids=lambda v: v.name)
def test_config_variant_passes_with_a_warning_and_fails_when_strict(variant, dtype, tmp_path, capsys) -> None:
    """A release config differing only in numerics fields: the pair loads with one warning per field, the features
    move but pass parity (CLI extract on the built-in media), and --strict_config refuses the pair."""
    folder = build_variant(variant, tmp_path / "checkpoints")
    pair = load_pair(BUILTIN_HF, folder, dtype=dtype)
    assert [line.split(":")[0] for line in pair.config_warnings] == [name for name, _ in variant.config]
    with pytest.raises(PairError, match=variant.config[0][0]):
        load_pair(BUILTIN_HF, folder, dtype=dtype, strict_config=True)
    argv = ["extract", "--hf_model_path", str(BUILTIN_HF), "--packing_model_path", str(folder), "--dtype", dtype,
            "--device", "cpu", "--images", *(str(p) for p in sorted(BUILTIN_MEDIA.glob("*.jpg"))),
            "--video1", str(sorted(BUILTIN_MEDIA.glob("*.mp4"))[0])]
    code = main([*argv, "--output_dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    print(f"\n{variant.kind} {variant.name} ({dtype}): {variant.description}\n{out}")
    assert code == 0, out + err
    assert out.count("WARNING: config difference") == len(variant.config)
    hf, packing, _ = read_features(tmp_path / "out")
    assert any(not np.array_equal(hf[key][0], packing[key]) for key in hf), f"{variant.name} changed no feature"
    assert main([*argv, "--strict_config", "--output_dir", str(tmp_path / "strict")]) == 2
    assert variant.config[0][0] in capsys.readouterr().err
