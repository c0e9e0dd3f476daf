"""The code rule: a checkpoint that ships its own code (auto_map) is gated with it (--trust-remote-code), checked with
vitparity's classes only when asked (--own-classes), refused otherwise; code that cannot be imported is one error
naming the file and the class; the code that ran, with its files' sha256, is recorded everywhere a run is read.

The checkpoints carry release-format code (tests/remote/release: the packing file imports flash-attn when it is
imported, so on this CPU machine it runs on the flash-attn stand-in)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from remote import RELEASE_CLASSES, release_checkpoint
from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA
from vitparity.cli import main
from vitparity.hub import ModelLoadError
from vitparity.junit_report import merge_report, read_junit
from vitparity.pair import load_pair, preflight_pair

pytestmark = pytest.mark.usefixtures("isolated")
ROPE_AXES_SWAPPED = {"modeling_onevision_encoder_packing.py": [(
    "self.rotary_emb(patch_positions.to(hidden_states.device))",
    "self.rotary_emb(patch_positions[:, [0, 2, 1]].to(hidden_states.device))",
)]}


@pytest.fixture
def release(tmp_path) -> tuple[Path, Path]:
    return release_checkpoint("hf", tmp_path / "release-hf"), release_checkpoint("packing", tmp_path / "release-pk")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_code_without_a_flag_is_refused_naming_the_entry_and_both_ways_on(release) -> None:
    hf, packing = release
    with pytest.raises(ModelLoadError) as refused:
        preflight_pair(hf, packing)
    message = str(refused.value)
    assert f"auto_map AutoModel: {RELEASE_CLASSES['hf'][1]}" in message and str(hf) in message
    assert "--trust-remote-code" in message and "--own-classes" in message
    with pytest.raises(ModelLoadError, match=RELEASE_CLASSES["packing"][1].replace(".", r"\.")):
        preflight_pair(BUILTIN_HF, packing)
    with pytest.raises(ModelLoadError, match="exclude each other"):
        preflight_pair(hf, packing, trust_remote_code=True, own_classes=True)


def test_own_classes_run_vitparity_and_say_that_the_checkpoint_code_did_not(release) -> None:
    pair = load_pair(*release, own_classes=True)
    for side in ("hf", "packing"):
        code = pair.side(side).code
        assert pair.side(side).source == "vitparity" and code.source == "vitparity"
        assert code.auto_map == RELEASE_CLASSES[side][1]
        assert "NOT run (--own-classes)" in code.headline() and "NOT the checkpoint's own code" in code.describe()
        assert all(name.startswith("vitparity/models/") for name in code.files)


def test_checkpoint_code_runs_and_its_files_are_recorded_with_digests(release) -> None:
    hf, packing = release
    pair = load_pair(hf, packing, trust_remote_code=True)
    for side, folder in (("hf", hf), ("packing", packing)):
        loaded = pair.side(side)
        assert loaded.source == "remote code" and loaded.code.class_name == RELEASE_CLASSES[side][1]
        module = RELEASE_CLASSES[side][1].split(".")[0] + ".py"
        assert loaded.code.files[module] == sha256(folder / module)
        assert loaded.code.files["configuration_onevision_encoder.py"] == sha256(
            folder / "configuration_onevision_encoder.py")
        recorded = pair.provenance()["models"][side]["code"]  # metadata.json and golden provenance
        assert recorded["files"] == loaded.code.files and recorded["class"] == loaded.code.class_name
    assert pair.hf.code.flash_attn is None  # its flash-attn import is optional: its own eager fallback runs
    assert pair.packing.code.flash_attn.startswith("stand-in vitparity.flash_attn_standin")
    assert "modeling_onevision_encoder_packing.py" in pair.packing.code.files  # and the file it imports relatively


def _break(folder: Path, kind: str) -> tuple[Path, str]:
    """Break the packing checkpoint's code one way; (the file to name, the class to name)."""
    module, class_name = RELEASE_CLASSES["packing"][1].split(".")
    path = folder / f"{module}.py"
    if kind == "missing":
        path.unlink()
    elif kind == "empty":
        path.write_text("\n")
    elif kind == "syntax":
        path.write_text(path.read_text().replace("class PackingLayer(nn.Module):", "class PackingLayer(nn.Module)"))
    elif kind == "no-class":
        path.write_text(path.read_text().replace(f"class {class_name}(", "class SomeOtherName("))
    elif kind == "relative-import":
        (folder / "configuration_onevision_encoder.py").unlink()
        path = folder / "configuration_onevision_encoder.py"
    return path, class_name


@pytest.mark.parametrize("kind", ["missing", "empty", "syntax", "no-class", "relative-import"])
def test_code_that_cannot_be_imported_is_one_error_naming_file_and_class(release, kind) -> None:
    hf, packing = release
    path, class_name = _break(packing, kind)
    with pytest.raises(ModelLoadError) as failed:
        preflight_pair(hf, packing, trust_remote_code=True)
    assert str(path) in str(failed.value) and class_name in str(failed.value), str(failed.value)


def test_extract_refuses_without_a_flag_and_records_the_code_with_it(release, tmp_path, capsys) -> None:
    hf, packing = release
    argv = ["extract", "--hf_model_path", str(hf), "--packing_model_path", str(packing), "--device", "cpu",
            "--image1", str(BUILTIN_MEDIA / "coffee_small.jpg")]
    assert main([*argv, "--output_dir", str(tmp_path / "refused")]) != 0
    assert "--own-classes" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main([*argv, "--trust-remote-code", "--output_dir", str(tmp_path / "out")]) == 0
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    code = metadata["models"]["packing"]["code"]
    assert code["source"] == "checkpoint code" and code["files"]["modeling_onevision_encoder_packing.py"] == sha256(
        packing / "modeling_onevision_encoder_packing.py")
    capsys.readouterr()
    assert main(["verify", "--features_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"Code of the packing model: checkpoint code {RELEASE_CLASSES['packing'][1]}" in out and "stand-in" in out


def test_suite_refuses_checkpoint_code_without_a_flag_in_one_usage_error(suite, release) -> None:
    hf, packing = release
    result = suite.run(f"--hf-model={hf}", f"--packing-model={packing}", "-k", "coffee")
    assert result.ret == 4  # usage error: no test collected or run
    err = result.stderr.str()
    assert err.count("ships its own code") == 1 and "--trust-remote-code" in err and "--own-classes" in err
    assert "passed" not in result.stdout.str() and "failed" not in result.stdout.str()


@pytest.mark.parametrize("dtype, plan", [("float32", ()), ("bfloat16", ("--determinism=sample",
                                                                         "--companions=sample"))],
                         ids=["float32-cpu-plan", "bfloat16-gpu-plan"])
def test_suite_gates_the_checkpoint_code_and_says_so_first(suite, tmp_path, dtype, plan) -> None:
    """A code fault of the release's packing file (RoPE h and w swapped) is caught with --trust-remote-code; the
    summary's first line says which code ran, and the JUnit XML and its report carry the files' digests."""
    hf = release_checkpoint("hf", tmp_path / "release-hf")
    packing = release_checkpoint("packing", tmp_path / "release-pk", ROPE_AXES_SWAPPED)
    junit = tmp_path / "run.xml"
    result = suite.run(f"--hf-model={hf}", f"--packing-model={packing}", "--trust-remote-code", f"--dtype={dtype}",
                       "-m", "not golden", "-k", "coffee_small", f"--junitxml={junit}", *plan)
    out = result.stdout.str()
    assert result.ret == 1 and "FAILED parity_tests/test_parity.py::test_parity[image-coffee_small.jpg]" in out
    summary = out.split("vitparity parity summary", 1)[1].splitlines()[1]
    assert summary.startswith("code checked: hf: the checkpoint's own code " + RELEASE_CLASSES["hf"][1])
    assert f"packing: the checkpoint's own code {RELEASE_CLASSES['packing'][1]} with the flash-attn stand-in" in summary
    run = read_junit(junit)
    digest = sha256(packing / "modeling_onevision_encoder_packing.py")
    assert run.code["packing"]["files"]["modeling_onevision_encoder_packing.py"] == digest
    report, passed = merge_report([run])
    assert not passed and f"modeling_onevision_encoder_packing.py {digest[:8]}" in report


def test_conflicting_or_bad_options_are_usage_errors(suite, release) -> None:
    both = suite.run("--trust-remote-code", "--own-classes", "-k", "coffee_small")
    assert both.ret == pytest.ExitCode.USAGE_ERROR
    assert "--trust-remote-code and --own-classes exclude each other" in both.stderr.str()
    bad = suite.run("--outputs=some", "-k", "coffee_small")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR and "--outputs=some: use one of" in bad.stderr.str()


def test_own_classes_and_no_reference_are_said_in_the_summary(suite, release, tmp_path) -> None:
    hf, packing = release
    own = suite.run(f"--hf-model={hf}", f"--packing-model={packing}", "--own-classes", "-m", "not golden", "-k",
                    "coffee_small")
    assert own.ret == 0
    head = own.stdout.str().split("vitparity parity summary", 1)[1].splitlines()
    assert head[1].startswith("code checked: hf: vitparity's own classes (OneVisionEncoderModel, its own code "
                              f"{RELEASE_CLASSES['hf'][1]} NOT run (--own-classes))")
    assert "reference OFF (no checkpoint code runs" in own.stdout.str()
    junit = tmp_path / "off.xml"
    off = suite.run(f"--hf-model={hf}", f"--packing-model={packing}", "--trust-remote-code", "--no-reference",
                    "-m", "not golden", "-k", "coffee_small", f"--junitxml={junit}")
    assert off.ret == 0 and "test_reference" not in off.stdout.str()
    assert "reference OFF (--no-reference: the reference is switched off)" in off.stdout.str()
    assert "reference OFF (--no-reference" in junit.read_text()
