"""The parity suite run end to end (pytester): it passes on the built-in pair and fails where it must."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vitparity.builtin import BUILTIN_PACKING
from vitparity.cli import main
from vitparity.loading import weight_files

from conftest import GOLDEN, golden_files, verdicts


@pytest.fixture(scope="module")
def faulty_packing(tmp_path_factory) -> Path:
    """The built-in packing checkpoint with q and k swapped in the fused qkv of the first layer."""
    folder = tmp_path_factory.mktemp("faulty-packing")
    shutil.copy(BUILTIN_PACKING / "config.json", folder / "config.json")
    for path in weight_files(BUILTIN_PACKING):
        tensors = load_file(path)
        for key in ("encoder.layers.0.self_attn.qkv.weight", "encoder.layers.0.self_attn.qkv.bias"):
            if key in tensors:
                q, k, v = tensors[key].chunk(3, dim=0)
                tensors[key] = torch.cat([k, q, v]).contiguous()
        save_file(tensors, folder / path.name, metadata={"format": "pt"})
    return folder


COST = re.compile(r"^(main|gw\d+|total): forwards: hf (\d+) \((\d+) tokens\), packing (\d+) \((\d+) tokens\); "
                  r"(?:forward tokens: [\d.]+x the one-pass minimum[^;]*; )?model loads: hf (\d+), packing (\d+)", re.M)


def costs(output: str) -> dict[str, tuple[int, ...]]:
    """Worker (or main, total) -> (hf forwards, hf tokens, packing forwards, packing tokens, hf loads, packing loads)."""
    return {m.group(1): tuple(int(g) for g in m.groups()[1:]) for m in COST.finditer(output)}


def run_total(output: str) -> tuple[int, ...]:
    found = costs(output)
    return found.get("total", found.get("main"))


def test_default_suite_passes_and_loads_each_model_once(suite) -> None:
    result = suite.run()
    result.assert_outcomes(passed=78)
    out = result.stdout.str()
    assert "24 snapshots passed" in out
    found = verdicts(out)
    cases = [case for case in found if "/" not in case]
    paths = [case for case in found if case.startswith("pos~")]
    order = [case for case in found if case.startswith("order~")]
    outputs = [case for case in found if case.startswith(("last_hidden_state/", "pooler_output/"))]
    # 12 cases (4 images, 4 videos, their 4 codec-style cases), 12 packed rows, 2 explicit-positions rows per video
    # and codec case, 3 token-order rows (one codec case: hf sparse, hf mosaic, packing), and last_hidden_state and
    # pooler_output of every case (test_outputs: --outputs=auto compares them all on the CPU)
    assert len(cases) == 12 and len(paths) == 16 and len(order) == 3 and len(outputs) == 2 * len(cases)
    assert len(found) == 12 + 12 + 16 + 3 + 24 and "outputs compared 12 cases;" in out
    assert set(found.values()) == {"PASS"}
    # each model once per case, once more for the determinism check (every case on the CPU), the hf model once
    # more per video and codec case (explicit positions), one packed forward per group holding every case once,
    # two more of the whole pack per group (companion swap: the even positions kept, then the odd ones), and the
    # token-order case once more on each path.
    tokens = sum(found_tokens(out, case) for case in cases)
    path_tokens = sum(found_tokens(out, case) for case in cases if not case.startswith("image-"))
    shuffled = found_tokens(out, order[0])
    packed = [case for case in found if case.startswith("packed/")]
    assert sorted(case.removeprefix("packed/") for case in packed) == sorted(cases)  # every case once in a pack
    assert "pack groups 2;" in out and "companion swaps 4;" in out
    assert costs(out)["main"] == (24 + 8 + 2, 2 * tokens + path_tokens + 2 * shuffled, 24 + 2 + 4 + 1,
                                  5 * tokens + shuffled, 1, 1)


def found_tokens(output: str, case: str) -> int:
    return int(re.search(rf"^{re.escape(case)}\s+(\d+)", output, re.M).group(1))


def test_k_video_selects_only_video_cases_and_xdist_agrees(suite) -> None:
    collected = suite.run("--collect-only", "-q", "-k", "video").stdout.lines
    ids = [line for line in collected if "::" in line]
    assert ids and all("video-" in line for line in ids)
    assert {re.search(r"video-\w+\.mp4", line).group(0) for line in ids} == {
        "video-astronaut_pan.mp4", "video-chelsea_pan.mp4", "video-coffee_zoom.mp4", "video-rocket_tilt.mp4"
    }
    serial = suite.run("-k", "video")
    parallel = suite.run("-k", "video", "-n", "2")
    assert serial.ret == parallel.ret == 0
    assert verdicts(serial.stdout.str()) == verdicts(parallel.stdout.str())
    # each video, its explicit-positions call twice, and its last_hidden_state and pooler_output (test_outputs)
    assert len(verdicts(serial.stdout.str())) == 4 + 2 * 4 + 2 * 4
    assert run_total(serial.stdout.str())[:4] == run_total(parallel.stdout.str())[:4]  # no forward done twice
    # 4 videos, no packed forward: the hf model also with explicit positions
    assert costs(serial.stdout.str())["main"][:4] == (12, 3 * 4448, 8, 2 * 4448)
    for worker, cost in costs(parallel.stdout.str()).items():
        assert worker == "total" or cost[4:] in ((1, 1), (0, 0))  # a worker with no group loads nothing


def test_planted_fault_fails_with_table_and_heat_maps(suite, faulty_packing) -> None:
    result = suite.run(f"--packing-model={faulty_packing}", "-m", "not golden", "--report-dir=report")
    assert result.ret == 1
    found = verdicts(result.stdout.str())
    packing_rows = {case: verdict for case, verdict in found.items() if not case.startswith(("pos~ctx/", "order~"))}
    # cases, packed, paths, and last_hidden_state and pooler_output of each case (test_outputs)
    assert len(packing_rows) == 12 + 12 + 8 + 2 * 12 and set(packing_rows.values()) == {"FAIL"}
    assert len(found) - len(packing_rows) == 8 + 3  # the hf model against itself, and each model shuffled: pass
    assert set(found.values()) - set(packing_rows.values()) <= {"PASS"}
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 9  # 12 cases, the packed batch
    heat_maps = sorted(p.name for p in (suite.path / "report").glob("*.png") if not p.name.endswith("-layers.png"))
    assert len(heat_maps) == 12 and all(name.startswith(("image-", "video-", "codec-")) for name in heat_maps)
    layer_plots = sorted(p.name for p in (suite.path / "report").glob("*-layers.png"))
    assert len(layer_plots) == 14  # one per failing test_parity or test_packed: 12 cases, 2 pack groups


def test_modified_golden_fails(suite) -> None:
    root = suite.golden_root
    target = next(root.glob("onevision_encoder_packing-*-float32-*/test_golden/test_golden[[]video-chelsea_pan.mp4-packing].npz"))
    with np.load(target) as archive:
        arrays = dict(archive)
    arrays["projection"][0] = -arrays["projection"][0]  # one token of one golden flipped
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    target.write_bytes(buffer.getvalue())

    result = suite.run("-m", "golden")
    result.assert_outcomes(passed=2 * 12 - 1, failed=1)  # 12 cases (4 images, 4 videos, 4 codec-style), 2 models
    out = result.stdout.str()
    assert "test_golden[video-chelsea_pan.mp4-packing]" in out
    assert "golden features differ" in out


def test_missing_golden_fails_without_the_update_flag(suite) -> None:
    shutil.rmtree(suite.golden_root)
    result = suite.run("-m", "golden", "-k", "coffee")
    result.assert_outcomes(failed=6)  # image-coffee_small, video-coffee_zoom and codec-coffee_zoom, each model
    assert "no golden for this case and model" in result.stdout.str()
    assert not (suite.golden_root).exists() or not golden_files(suite.golden_root)


@pytest.mark.parametrize("flag", ["--snapshot-update", "--regenerate-goldens"])
def test_broken_pair_is_never_blessed(suite, faulty_packing, flag) -> None:
    root = suite.golden_root
    before = golden_files(root)
    result = suite.run(f"--packing-model={faulty_packing}", flag)
    assert result.ret == 1
    assert golden_files(root) == before  # nothing written for the faulty model, nothing rewritten for the other
    assert "refused" in result.stdout.str().lower()


def test_regenerate_rewrites_every_golden_and_orphans_fail_the_full_run(suite) -> None:
    root = suite.golden_root
    shutil.rmtree(root)
    result = suite.run("--regenerate-goldens", "--dtype", "float32")
    assert result.ret == 0
    assert set(golden_files(root)) == {name for name in golden_files(GOLDEN) if "-float32" in name}

    assert suite.run().ret == 0
    orphan = next(root.rglob("*.npz"))
    shutil.copy(orphan, orphan.with_name("test_golden[image-removed.jpg-hf].npz"))
    full = suite.run()
    assert full.ret == 1 and "1 snapshot unused" in full.stdout.str()
    assert "FAILED although no test failed: unused goldens" in full.stdout.str()
    assert suite.run("-k", "video").ret == 0  # a narrowed run does not judge the goldens it did not select


def test_record_in_junit_xml(suite, capsys) -> None:
    result = suite.run("-k", "image-coffee or packed", "--junitxml=junit.xml")
    assert result.ret == 0
    assert "record_property is incompatible" not in result.stdout.str() and "PytestWarning" not in result.stdout.str()
    xml = (suite.path / "junit.xml").read_text()
    rows = [json.loads(m.replace("&quot;", '"')) for m in re.findall(r'name="vitparity" value="([^"]*)"', xml)]
    assert rows and rows[0]["name"] == "image-coffee_small.jpg" and rows[0]["passed"] is True
    assert 'name="companion_swap[' in xml
    assert main(["report-junit", str(suite.path / "junit.xml")]) == 0
    assert "image-coffee_small.jpg" in capsys.readouterr().out


CHECK_FAULTS = '''
import torch

from vitparity.models import OneVisionEncoderPackingModel


class StaleRopePackingModel(OneVisionEncoderPackingModel):
    """Keeps RoPE inverse frequencies in a non-persistent buffer, as the release code does; its values are wrong
    (and, built on the meta device, not even initialised). The forward does not read it: parity holds."""

    def __init__(self, config):
        super().__init__(config)
        self.rotary.register_buffer("inv_freq", torch.full((8,), 0.3), persistent=False)


class NoisyPackingModel(OneVisionEncoderPackingModel):
    """Adds fresh noise (1e-3) to its outputs on every forward: parity holds, determinism does not."""

    def forward(self, hidden_states, grid_thw, patch_positions=None, output_hidden_states=None, return_dict=None):
        out = super().forward(hidden_states, grid_thw, patch_positions, output_hidden_states, return_dict=True)
        out.hidden_states = tuple(h + 1e-3 * torch.randn_like(h) for h in out.hidden_states)
        return out
'''


def code_variant(folder: Path, class_name: str, **config_changes) -> Path:
    """The built-in packing checkpoint (same weight bytes) run by a class of CHECK_FAULTS, or with config changes."""
    shutil.copytree(BUILTIN_PACKING, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    if class_name:
        (folder / "modeling_check_faults.py").write_text(CHECK_FAULTS)
        config["auto_map"] = {"AutoModel": f"modeling_check_faults.{class_name}"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def failed_tests(result: pytest.RunResult) -> set[str]:
    return {line.split()[1].split("::")[1] for line in result.outlines if line.startswith(("FAILED", "ERROR"))}


def test_stale_rope_buffer_is_caught_by_the_loading_check_alone(suite, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = code_variant(tmp_path / "stale-rope", "StaleRopePackingModel")
    result = suite.run(f"--packing-model={folder}", "--trust-remote-code", "-m", "not golden")
    assert failed_tests(result) == {"test_loaded_weights[packing]"}
    assert "rotary.inv_freq" in result.stdout.str() and "not RoPE inverse frequencies" in result.stdout.str()


def test_nondeterministic_model_is_caught_by_the_determinism_check(suite, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = code_variant(tmp_path / "noisy", "NoisyPackingModel")
    result = suite.run(f"--packing-model={folder}", "--trust-remote-code", "-m", "not golden and not packed")
    found = verdicts(result.stdout.str())
    cases = [case for case in found if "/" not in case]  # and the input-path and token-order rows of those cases
    assert len(cases) == 12 and set(found.values()) == {"PASS"}  # parity alone cannot see it
    assert failed_tests(result) == {f"test_deterministic[{case}]" for case in cases}
    assert "packing model not deterministic" in result.stdout.str()
    assert "between two passes on the same pixels" in result.stdout.str() and "decoding" not in result.stdout.str()
    assert "a third pass differs from both" in result.stdout.str()  # fresh noise on every pass: no odd one out


def test_nondeterministic_decoding_is_told_apart_from_the_models(suite, monkeypatch) -> None:
    """A decoder that changes one pixel value on every call after the first fails the check, named as decoding."""
    import vitparity.suite.session as session

    load_media, calls = session.load_media, []

    def drifting_load_media(path, **options):
        media = load_media(path, **options)
        if calls:
            media.frames = media.frames.copy()
            media.frames.flat[0] ^= 1
        calls.append(path)
        return media

    monkeypatch.setattr(session, "load_media", drifting_load_media)
    result = suite.run("-k", "deterministic and coffee_small")
    assert failed_tests(result) == {"test_deterministic[image-coffee_small.jpg]"}
    assert "decoding the media twice gave different pixels (1 of" in result.stdout.str()
    assert "model not deterministic" not in result.stdout.str()


def test_configs_that_disagree_are_refused_before_any_forward(suite, tmp_path) -> None:
    folder = code_variant(tmp_path / "one-head", "", num_attention_heads=1)
    result = suite.run(f"--packing-model={folder}", "-k", "coffee")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # known from config.json: one message at start, no test
    assert "do not describe the same model (fields that define the weights): num_attention_heads: hf 2 vs packing 1" \
        in result.stderr.str()


def test_default_folders_resolve_against_the_repository_root(suite, monkeypatch) -> None:
    """Run from a subfolder: the default golden folder is still the repository's, nothing is created here."""
    monkeypatch.chdir(suite.path / "parity_tests")
    result = suite.pytester.runpytest_inprocess("-p", "no:cacheprovider", "--device", "cpu", "-k", "golden and coffee")
    result.assert_outcomes(passed=6)  # image-coffee_small, video-coffee_zoom and codec-coffee_zoom, each model
    assert not (suite.path / "parity_tests" / "fixtures").exists()


def test_goldens_of_other_settings_are_neither_used_nor_replaced(suite) -> None:
    """Goldens made with 8 frames are never compared with 4-frame features, nor rewritten by a 4-frame update."""
    before = suite.goldens()
    missing = suite.run("--num-frames=4", "-k", "golden and coffee_zoom")
    missing.assert_outcomes(failed=4)  # video-coffee_zoom and its codec-style case, each model
    assert "no golden for this case and model in" in missing.stdout.str() and "-float32-4of64-crop" in missing.stdout.str()
    updated = suite.run("--num-frames=4", "--snapshot-update", "-k", "golden and coffee_zoom")
    assert updated.ret == 0
    after = suite.goldens()
    assert {name: data for name, data in after.items() if name in before} == before
    assert sorted(set(after) - set(before)) == [
        f"{folder}-float32-4of64-crop/test_golden/test_golden[{case}-coffee_zoom.mp4-{side}].npz"
        for folder, side in (("onevision_encoder-41bbf9a8a5e4", "hf"), ("onevision_encoder_packing-0a8da2050499", "packing"))
        for case in ("codec", "video")
    ]


def poisoned_hf(folder: Path, key: str) -> Path:
    """The built-in non-packing checkpoint with one NaN in `key`."""
    from vitparity.builtin import BUILTIN_HF

    shutil.copytree(BUILTIN_HF, folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def test_nan_weights_outside_the_features_fail_and_are_never_blessed(suite, tmp_path) -> None:
    """A NaN in the pooling head leaves hidden_states[-2] (and so parity) intact: the weight check fails, and
    no golden is written for the pair even with --snapshot-update."""
    folder = poisoned_hf(tmp_path / "nan-head", "head.probe")
    before = suite.goldens()
    result = suite.run(f"--hf-model={folder}", "--snapshot-update", "-k", "coffee or loaded_weights")
    cases = ("image-coffee_small.jpg", "video-coffee_zoom.mp4", "codec-coffee_zoom.mp4")
    assert failed_tests(result) == {"test_loaded_weights[hf]"} | {
        f"test_golden[{case}-{side}]" for case in cases for side in ("hf", "packing")
    } | {f"test_outputs[{case}]" for case in cases}  # the head's NaN reaches pooler_output
    assert "head.probe: 1 of" in result.stdout.str() and "the loaded weights are not sane" in result.stdout.str()
    assert suite.goldens() == before


def test_nan_features_are_not_called_nondeterminism(suite, tmp_path) -> None:
    folder = poisoned_hf(tmp_path / "nan-layer", "encoder.layers.0.mlp.fc1.weight")
    result = suite.run(f"--hf-model={folder}", "-k", "deterministic and coffee_small")
    assert failed_tests(result) == {"test_deterministic[image-coffee_small.jpg]"}
    assert "hf model gives NaN or Inf features" in result.stdout.str() and "not deterministic" not in result.stdout.str()


def test_more_frames_than_the_temporal_context_is_one_clear_error(suite) -> None:
    result = suite.run("--num-frames=65", "-m", "not golden", "-k", "coffee or packed")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = "--num-frames=65 does not fit the temporal context of"
    assert message in result.stderr.str() and "Traceback" not in result.stderr.str()
