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

from vitparity.builtin import BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.cli import main
from vitparity.loading import weight_files
from vitparity.suite.cases import collect_cases, make_groups
from vitparity.suite.settings import DEFAULT_PACK_TOKENS

from conftest import GOLDEN, ROW, golden_files, verdicts

# The bundled media (fixtures/media) as the default CPU run plans it: each image and video at native size, and
# each video's codec-style case (8 frames' worth of tokens), in the pack groups of the CPU budget. The counts below
# are derived from these, so adding a bundled file changes them without a new magic number.
BUNDLED_CASES = collect_cases([BUILTIN_MEDIA], patch_size=14, align="crop", num_frames=8, codec_frames=8)
BUNDLED_GROUPS = make_groups(BUNDLED_CASES, DEFAULT_PACK_TOKENS["cpu"])


def bundled(*kinds: str, name: str = "") -> list[str]:
    """Ids of the bundled cases of these kinds ("image", "video", "codec"), of files whose name holds `name`."""
    return [case.id for case in BUNDLED_CASES if case.kind in kinds and name in case.path.name]


def batch_plan(selected: set[str]) -> tuple[int, dict[str, int]]:
    """(forwards, token factor per case id) of test_batch over the `selected` case ids: in each pack group the hf
    model runs the cases of one input shape (kind, frames, patches per frame) as one batch, and a case with no other
    of its shape with its mirror image (twice its tokens). Returns forwards and {case id: 1 or 2}."""
    forwards, factor = 0, {}
    for group in BUNDLED_GROUPS:
        shapes: dict[tuple, list[str]] = {}
        for case in group.cases:
            if case.id in selected:
                shapes.setdefault((case.kind == "image", case.frames, case.patches), []).append(case.id)
        for ids in shapes.values():
            forwards += 1
            factor.update({case_id: 1 if len(ids) > 1 else 2 for case_id in ids})
    return forwards, factor


def rows(output: str) -> list[tuple[str, str]]:
    """(case, verdict) of every row of the summary table, in order: unlike `verdicts`, rows whose names the table
    cuts to the same 32 characters (last_hidden_state/codec-coffe...) are each counted."""
    return [(m.group(1), m.group(2)) for m in ROW.finditer(output)]


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
    every, groups = bundled("image", "video", "codec"), len(BUNDLED_GROUPS)
    with_paths, grid = bundled("video", "codec"), bundled("image", "video")
    result = suite.run()
    # per case test_parity, test_deterministic, test_golden of each model, test_outputs and test_batch; per video
    # and codec case test_input_paths; one test_token_order; per pack group test_packed,
    # test_packing_independent_of_neighbours, test_companions_do_not_leak and test_packing_grid_call; and
    # test_loaded_weights of each model and test_converted_weights
    result.assert_outcomes(passed=6 * len(every) + len(with_paths) + 1 + 4 * groups + 3)
    out = result.stdout.str()
    assert f"{2 * len(every)} snapshots passed" in out  # a golden per case and model
    found, table = verdicts(out), rows(out)
    cases = [case for case in found if "/" not in case]
    paths = [case for case, _ in table if case.startswith("pos~")]
    order = [case for case, _ in table if case.startswith("order~")]
    outputs = [case for case, _ in table if case.startswith(("last_hidden_state/", "pooler_output/"))]
    batch = [case for case, _ in table if case.startswith("batch/")]
    grid_rows = [case for case, _ in table if case.startswith("grid/")]
    # every case (each image and video, each video's codec-style case), a packed row per case, 2 explicit-positions
    # rows per video and codec case, 3 token-order rows (one codec case: hf sparse, hf mosaic, packing),
    # last_hidden_state and pooler_output of every case (test_outputs: --outputs=auto compares them all on the CPU),
    # a batched row per case (test_batch) and a grid_thw-only row per image and video (test_packing_grid_call)
    assert sorted(cases) == sorted(every) and len(paths) == 2 * len(with_paths) and len(order) == 3
    assert len(outputs) == 2 * len(cases)
    assert sorted(batch) == sorted(f"batch/{case}" for case in every)
    assert sorted(grid_rows) == sorted(f"grid/{case}" for case in grid)
    assert len(table) == 2 * len(every) + 2 * len(with_paths) + 3 + 2 * len(every) + len(every) + len(grid)
    assert f"outputs compared {len(every)} cases;" in out
    assert {verdict for _, verdict in table} == {"PASS"}
    # each model once per case, once more for the determinism check (every case on the CPU), the hf model once
    # more per video and codec case (explicit positions), one packed forward per group holding every case once,
    # two more of the whole pack per group (companion swap: the even positions kept, then the odd ones), the
    # token-order case once more on each path, the hf model once per batch (test_batch: `batch_plan`), and the
    # packing model twice per group on its images and videos (test_packing_grid_call: grid_thw only, then the
    # grid's positions given).
    tokens = sum(found_tokens(out, case) for case in cases)
    path_tokens = sum(found_tokens(out, case) for case in with_paths)
    grid_tokens = sum(found_tokens(out, case) for case in grid)
    batches, factor = batch_plan(set(every))
    batch_tokens = sum(factor[case] * found_tokens(out, case) for case in every)
    shuffled = found_tokens(out, order[0])
    packed = [case for case in found if case.startswith("packed/")]
    assert sorted(case.removeprefix("packed/") for case in packed) == sorted(cases)  # every case once in a pack
    assert f"pack groups {groups};" in out and f"companion swaps {2 * groups};" in out
    assert f"batched {len(every)} cases;" in out and f"grid_thw-only calls {groups} packs;" in out
    n = len(every)
    assert costs(out)["main"] == (2 * n + len(with_paths) + 2 + batches,
                                  2 * tokens + path_tokens + 2 * shuffled + batch_tokens,
                                  2 * n + groups + 2 * groups + 1 + 2 * groups,
                                  5 * tokens + shuffled + 2 * grid_tokens, 1, 1)


def found_tokens(output: str, case: str) -> int:
    return int(re.search(rf"^{re.escape(case)}\s+(\d+)", output, re.M).group(1))


def test_k_video_selects_only_video_cases_and_xdist_agrees(suite) -> None:
    collected = suite.run("--collect-only", "-q", "-k", "video").stdout.lines
    ids = [line for line in collected if "::" in line]
    assert ids and all("video-" in line for line in ids)
    videos = bundled("video")  # a case id may hold more than \w: video-coffee_tilt@4f.mp4 (@<N>f: its frame count)
    assert {re.search(r"video-[^\s\[\]]+?\.mp4", line).group(0) for line in ids} == set(videos)
    serial = suite.run("-k", "video")
    parallel = suite.run("-k", "video", "-n", "2")
    assert serial.ret == parallel.ret == 0
    assert verdicts(serial.stdout.str()) == verdicts(parallel.stdout.str())
    assert sorted(rows(serial.stdout.str())) == sorted(rows(parallel.stdout.str()))
    # each video, its explicit-positions call twice, its last_hidden_state and pooler_output (test_outputs), and
    # its batched row (test_batch); no test_packing_grid_call (its ids name pack groups, not cases)
    assert len(rows(serial.stdout.str())) == len(videos) + 2 * len(videos) + 2 * len(videos) + len(videos)
    assert run_total(serial.stdout.str())[:4] == run_total(parallel.stdout.str())[:4]  # no forward done twice
    # the videos, no packed forward: the hf model also with explicit positions, and in its batches (test_batch:
    # `batch_plan` over the videos alone)
    tokens = sum(found_tokens(serial.stdout.str(), case) for case in videos)
    batches, factor = batch_plan(set(videos))
    batch_tokens = sum(factor[case] * found_tokens(serial.stdout.str(), case) for case in videos)
    assert costs(serial.stdout.str())["main"][:4] == (3 * len(videos) + batches, 3 * tokens + batch_tokens,
                                                      2 * len(videos), 2 * tokens)
    for worker, cost in costs(parallel.stdout.str()).items():
        assert worker == "total" or cost[4:] in ((1, 1), (0, 0))  # a worker with no group loads nothing


def test_planted_fault_fails_with_table_and_heat_maps(suite, faulty_packing) -> None:
    result = suite.run(f"--packing-model={faulty_packing}", "-m", "not golden", "--report-dir=report")
    assert result.ret == 1
    every, with_paths = bundled("image", "video", "codec"), bundled("video", "codec")
    grid, groups = bundled("image", "video"), len(BUNDLED_GROUPS)
    table = rows(result.stdout.str())
    # rows comparing a model with itself: the hf model's explicit positions and batches, the packing model's
    # grid_thw-only call, and each model shuffled
    own = ("pos~ctx/", "order~", "batch/", "grid/")
    packing_rows = [(case, verdict) for case, verdict in table if not case.startswith(own)]
    # cases, packed, paths, and last_hidden_state and pooler_output of each case (test_outputs)
    assert len(packing_rows) == len(every) + len(every) + len(with_paths) + 2 * len(every)
    assert {verdict for _, verdict in packing_rows} == {"FAIL"}
    # the hf model against itself (explicit positions, a batched row per case), the packing model's grid_thw-only
    # call per image and video, and each model shuffled: pass
    assert len(table) - len(packing_rows) == len(with_paths) + len(every) + len(grid) + 3
    assert {verdict for case, verdict in table if case.startswith(own)} == {"PASS"}
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= len(every) + groups  # every case's test_parity, each group's test_packed
    heat_maps = sorted(p.name for p in (suite.path / "report").glob("*.png") if not p.name.endswith("-layers.png"))
    assert len(heat_maps) == len(every) and all(name.startswith(("image-", "video-", "codec-")) for name in heat_maps)
    layer_plots = sorted(p.name for p in (suite.path / "report").glob("*-layers.png"))
    assert len(layer_plots) == len(every) + groups  # one per failing test_parity or test_packed: cases, pack groups


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
    # a golden per bundled case (each image and video, each video's codec-style case) and model, one flipped
    result.assert_outcomes(passed=2 * len(bundled("image", "video", "codec")) - 1, failed=1)
    out = result.stdout.str()
    assert "test_golden[video-chelsea_pan.mp4-packing]" in out
    assert "golden features differ" in out


def test_missing_golden_fails_without_the_update_flag(suite) -> None:
    shutil.rmtree(suite.golden_root)
    result = suite.run("-m", "golden", "-k", "coffee")
    # the cases of the coffee_* files (image-coffee_small, video- and codec-coffee_zoom, ...-coffee_tilt@4f), each model
    result.assert_outcomes(failed=2 * len(bundled("image", "video", "codec", name="coffee")))
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
    # every bundled case (each image and video, each video's codec-style case); parity alone cannot see it
    assert sorted(cases) == sorted(bundled("image", "video", "codec")) and set(found.values()) == {"PASS"}
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
    # the cases of the coffee_* files (image-coffee_small, video- and codec-coffee_zoom, ...-coffee_tilt@4f), each model
    result.assert_outcomes(passed=2 * len(bundled("image", "video", "codec", name="coffee")))
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
    cases = bundled("image", "video", "codec", name="coffee")  # the cases of the coffee_* files
    assert len(cases) >= 3 and failed_tests(result) == {"test_loaded_weights[hf]"} | {
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
