"""One temporal context for a non-packing model whose config has no `rope_temporal_size` (the release's config
class has none): the release's 64 frames, in the frame-limit check, extraction, metadata.json and golden folder
names; and the restored buffers named in metadata.json, verify's output, the suite summary and golden provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.cli import main
from vitparity.extract import TEMPORAL_CONTEXT
from vitparity.features_io import read_features
from vitparity.pair import PairError, load_pair, preflight_pair, temporal_context
from vitparity.snapshots import load_golden

from remote import buffered_checkpoint

IMAGE = BUILTIN_MEDIA / "coffee_small.jpg"
VIDEO = BUILTIN_MEDIA / "chelsea_pan.mp4"  # 16 frames
RESTORED = ["rotary.freqs_scale", "rotary.inv_freq_h", "rotary.inv_freq_t", "rotary.inv_freq_w",
            "rotary.position_axes"]

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def remote_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Both built-in checkpoints as remote code whose hf config.json has no rope_temporal_size."""
    return buffered_checkpoint("hf", tmp_path / "hf"), buffered_checkpoint("packing", tmp_path / "packing")


def test_the_rule() -> None:
    assert TEMPORAL_CONTEXT == 64
    assert temporal_context({}) == 64
    assert temporal_context({"rope_temporal_size": 16}) == 16
    assert temporal_context({"rope_temporal_size": None}) is None  # the field given as null: the frame count


def test_config_without_the_field_gets_64_before_and_after_loading(remote_pair: tuple[Path, Path]) -> None:
    hf, packing = remote_pair
    assert "rope_temporal_size" not in json.loads((hf / "config.json").read_text())
    assert preflight_pair(hf, packing, num_frames=64, trust_remote_code=True).temporal_context == 64
    with pytest.raises(PairError, match=r"num_frames=65 does not fit .*rope_temporal_size=64"):
        preflight_pair(hf, packing, num_frames=65, trust_remote_code=True)
    pair = load_pair(hf, packing, trust_remote_code=True)
    assert not hasattr(pair.hf.model.config, "rope_temporal_size")
    assert pair.temporal_context == 64 and pair.provenance()["temporal_context"] == 64


def _extract(capsys: pytest.CaptureFixture[str], folder: Path, *argv: object) -> tuple[int, str, str]:
    args = ["extract", "--image1", IMAGE, "--video1", VIDEO, "--num_frames", 4, "--output_dir", folder, *argv]
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_through_remote_code_equals_the_builtin_classes(
    remote_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf, packing = remote_pair
    code, out, err = _extract(capsys, tmp_path / "remote", "--hf_model_path", hf, "--packing_model_path", packing,
                              "--trust_remote_code")
    assert code == 0, out + err
    assert f"NOTE: hf model: restored buffers: {', '.join(RESTORED)}" in out
    assert f"NOTE: packing model: restored buffers: {', '.join(RESTORED)}" in out
    code, out, err = _extract(capsys, tmp_path / "builtin")
    assert code == 0, out + err
    assert "restored buffers" not in out
    remote_hf, remote_packing, metadata = read_features(tmp_path / "remote")
    builtin_hf, builtin_packing, builtin_metadata = read_features(tmp_path / "builtin")
    assert metadata["temporal_context"] == builtin_metadata["temporal_context"] == 64
    assert metadata["inputs"]["video1"]["temporal_positions"] == [0, 21, 42, 63]
    assert metadata["restored_buffers"] == {"hf": RESTORED, "packing": RESTORED}
    assert builtin_metadata["restored_buffers"] == {"hf": [], "packing": []}
    for key in ("image1", "video1"):
        np.testing.assert_array_equal(remote_hf[key], builtin_hf[key])
        np.testing.assert_array_equal(remote_packing[key], builtin_packing[key])


def test_extract_with_strict_buffers_refuses(remote_pair: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    hf, packing = remote_pair
    code, out, err = _extract(capsys, tmp_path / "o", "--hf_model_path", hf, "--packing_model_path", packing,
                              "--trust_remote_code", "--strict-buffers")
    assert code == 2 and out == ""
    assert f"{hf}: non-persistent buffers differ from a fresh construction of BufferedHFModel" in err
    assert "rotary.position_axes: largest difference 7" in err
    assert not (tmp_path / "o").exists()


def test_suite_names_the_context_and_the_restored_buffers(suite, remote_pair: tuple[Path, Path]) -> None:
    hf, packing = remote_pair
    args = [f"--hf-model={hf}", f"--packing-model={packing}", "--trust-remote-code", "--golden-dir=goldens"]
    result = suite.run(*args, "--snapshot-update", "-k", "golden and coffee_small")
    assert result.ret == 0, result.stdout.str()
    folders = sorted(path.name for path in (suite.path / "goldens").iterdir())
    assert len(folders) == 2 and all(name.endswith("-float32-8of64-crop") for name in folders), folders
    assert ("restored buffers: " + ", ".join(f"{side}: {name}" for side in ("hf", "packing") for name in RESTORED)
            in result.stdout.str())
    for path in (suite.path / "goldens").rglob("*.npz"):
        assert load_golden(path.read_bytes())[2]["restored_buffers"] == RESTORED
    assert suite.run(*args, "-k", "loaded_weights").ret == 0
    strict = suite.run(*args, "-k", "loaded_weights", "--strict-buffers")
    assert strict.ret == 1 and "strict buffers: refused instead of restored" in strict.stdout.str()
