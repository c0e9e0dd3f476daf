"""Hub ids resolved offline from a HuggingFace cache laid out in a temporary folder: no network, ever."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.checkpoint_code import CHECKPOINT_CODE
from vitparity.cli import main
from vitparity.features_io import read_features
from vitparity.hub import ModelRef, hub_id, resolve_model
from vitparity.loading import ModelLoadError, load_model
from vitparity.pair import load_pair

from remote import release_checkpoint

COMMITS = {"hf": "1" * 40, "packing": "2" * 40}
REPOS = {"hf": "example-org/tiny-encoder", "packing": "example-org/tiny-encoder-packing"}


def _cache_repo(hub: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """models--org--name/snapshots/<commit>/ holding a copy of `source`, and refs/<name> -> commit."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = Path(shutil.copytree(source, repo / "snapshots" / commit))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def cache_builtin_models(home: Path, monkeypatch: pytest.MonkeyPatch, repos: dict[str, str] = REPOS,
                         refs: tuple[str, ...] = ("main", "v1"), sources: dict[str, Path] | None = None) -> Path:
    """HF_HOME at `home` with both built-in checkpoints (or the `sources` folders, side -> folder) cached as `repos`
    (side -> repo id) at `refs`; HF_HUB_OFFLINE=1."""
    sources = sources or {"hf": BUILTIN_HF, "packing": BUILTIN_PACKING}
    for side in ("hf", "packing"):
        _cache_repo(home / "hub", repos[side], COMMITS[side], sources[side], refs=refs)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline cache of the built-in checkpoints in tmp_path, which is also the current folder."""
    monkeypatch.chdir(tmp_path)
    return cache_builtin_models(tmp_path / "hf-home", monkeypatch)


def test_hub_id_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/name") == ("org/name", None)
    assert hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert hub_id("org/name@" + "a" * 40) == ("org/name", "a" * 40)
    for local in ("/abs/path", "./org/name", "name", "a/b/c", Path("org/name")):
        assert hub_id(local) is None, local


def test_load_model_from_an_offline_cache(offline_cache: Path) -> None:
    loaded = load_model(REPOS["hf"])
    assert loaded.side == "hf" and loaded.class_name == "OneVisionEncoderModel"
    snapshot = offline_cache / "hub" / "models--example-org--tiny-encoder" / "snapshots" / COMMITS["hf"]
    assert Path(loaded.path) == snapshot
    assert (loaded.ref.repo_id, loaded.ref.revision, loaded.ref.commit) == (REPOS["hf"], None, COMMITS["hf"])
    pinned = resolve_model(f"{REPOS['hf']}@v1")
    assert (pinned.revision, pinned.commit) == ("v1", COMMITS["hf"])


@pytest.mark.usefixtures("isolated")
def test_a_hub_release_runs_its_own_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release on the Hub ships its modeling files (`auto_map`): resolved offline, the code in the snapshot runs
    with trust_remote_code, and is refused naming the flag without it."""
    monkeypatch.chdir(tmp_path)
    cache_builtin_models(tmp_path / "hf-home", monkeypatch,
                         sources={side: release_checkpoint(side, tmp_path / "release" / side) for side in REPOS})
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(REPOS["hf"])
    for side in ("hf", "packing"):
        loaded = load_model(f"{REPOS[side]}@v1", trust_remote_code=True)
        assert loaded.source == "remote code" and loaded.code.source == CHECKPOINT_CODE
        assert loaded.code.class_name == ("modeling_onevision_encoder.OneVisionEncoderModel" if side == "hf" else
                                          "modeling_onevision_encoder_packing.OneVisionEncoderPackingModel")
        assert loaded.path.endswith(COMMITS[side]) and loaded.ref.commit == COMMITS[side]
        assert set(loaded.code.files) >= {"modeling_onevision_encoder.py", "configuration_onevision_encoder.py"}


def test_unknown_hub_id_offline_names_the_cache(offline_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model("example-org/absent")
    message = str(error.value)
    assert "example-org/absent" in message and "HF_HUB_OFFLINE=1" in message and str(offline_cache / "hub") in message
    with pytest.raises(ModelLoadError, match="revision nope"):
        resolve_model(f"{REPOS['hf']}@nope")


def test_a_local_folder_wins_over_a_hub_id(offline_cache: Path, tmp_path: Path) -> None:
    shutil.copytree(BUILTIN_PACKING, tmp_path / REPOS["hf"])  # a packing model where the hub id points at an hf one
    loaded = load_model(REPOS["hf"])
    assert loaded.side == "packing" and loaded.ref.repo_id is None and loaded.ref.commit is None


def test_pair_and_cli_record_repo_and_commit(offline_cache: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pair = load_pair(REPOS["hf"], REPOS["packing"])
    models = pair.provenance()["models"]
    for side in ("hf", "packing"):
        assert (models[side]["repo_id"], models[side]["commit"]) == (REPOS[side], COMMITS[side])
    code = main(["extract", "--hf_model_path", REPOS["hf"], "--packing_model_path", f"{REPOS['packing']}@v1",
                 "--image1", str(BUILTIN_MEDIA / "coffee_small.jpg"), "--output_dir", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    metadata = read_features(tmp_path / "o")[2]
    assert metadata["hf_model_path"] == REPOS["hf"]
    assert metadata["models"]["hf"]["commit"] == COMMITS["hf"]
    assert (metadata["models"]["packing"]["revision"], metadata["models"]["packing"]["commit"]) == ("v1", COMMITS["packing"])
    json.dumps(metadata)  # everything recorded is plain JSON


def test_a_resolved_reference_is_loaded_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model does not resolve a ModelRef again: the pair's references (repo, commit) reach the loaded models."""
    ref = ModelRef("example-org/tiny@v2", BUILTIN_HF, "example-org/tiny", "v2", "0" * 40)
    monkeypatch.setattr("vitparity.loading.resolve_model", lambda spec: pytest.fail(f"resolved {spec} again"))
    loaded = load_model(ref)
    assert loaded.ref is ref and loaded.path == str(BUILTIN_HF)


def test_hub_imports_neither_the_loader_nor_torch() -> None:
    """vitparity.loading imports vitparity.hub, never the other way round."""
    code = "import sys, vitparity.hub; print(sorted({'vitparity.loading', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.usefixtures("isolated")
def test_a_hub_release_with_its_rope_buffers_saved_passes_every_check(suite, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean release whose files carry the RoPE buffers, resolved from a hub snapshot: its goldens written, then
    every check (weights and buffers, converted weights, parity, outputs, the reference, goldens) passes."""
    from faults.release import RELEASE_VARIANTS, build_release_variant

    variant = next(v for v in RELEASE_VARIANTS if v.name == "clean_buffers_saved")
    hf, packing = build_release_variant(variant, tmp_path / "release")
    cache_builtin_models(tmp_path / "hf-home", monkeypatch, sources={"hf": hf, "packing": packing})
    args = (f"--hf-model={REPOS['hf']}@v1", f"--packing-model={REPOS['packing']}@v1", "--trust-remote-code",
            f"--golden-dir={tmp_path / 'goldens'}", "-k", "image-coffee_small.jpg or codec-rocket_tilt.mp4 or weights")
    written = suite.run(*args, "--snapshot-update")
    assert written.ret == 0, written.stdout.str()[-3000:]
    checked = suite.run(*args)
    outcomes = checked.parseoutcomes()
    assert checked.ret == 0 and "failed" not in outcomes and outcomes["passed"] >= 12, checked.stdout.str()[-3000:]
    assert {"test_golden", "test_converted_weights", "test_loaded_weights", "test_reference"} <= {
        report.nodeid.split("::")[-1].split("[")[0] for report in checked.reprec.getreports("pytest_runtest_logreport")}
