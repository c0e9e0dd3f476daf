"""Both implementations, the converter and the loader, in float32 on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from vitparity import ModelLoadError, load_model
from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING, make_tiny_hf_model
from vitparity.convert import ConversionError, convert_checkpoint, hf_to_packing_state_dict, packing_to_hf_state_dict
from vitparity.extract import Sample, extract_hf, extract_packing, packing_inputs, stops_early, temporal_positions
from vitparity.models import (
    OneVisionEncoderConfig,
    OneVisionEncoderModel,
    OneVisionEncoderPackingConfig,
    OneVisionEncoderPackingModel,
)
from vitparity.models.layers import VisionRotary3D, rotate_pairs

ATOL = 1e-4
MIN_COS = 0.99999


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return load_model(BUILTIN_HF).model, load_model(BUILTIN_PACKING).model


def random_sample(name: str, t: int, h: int, w: int, seed: int, kind: str | None = None) -> Sample:
    gen = torch.Generator().manual_seed(seed)
    kind = kind or ("video" if t > 1 else "image")
    positions = temporal_positions(t) if kind == "video" else [0]
    return Sample(name, kind, torch.randn(3, t, h * 14, w * 14, generator=gen), (t, h, w), positions)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= ATOL
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() >= MIN_COS


CASES = [
    random_sample("image-wide", 1, 5, 9, 1),
    random_sample("image-tall", 1, 11, 4, 2),
    random_sample("image-one-patch", 1, 1, 1, 3),
    random_sample("video-8", 8, 4, 6, 4),
    random_sample("video-1", 1, 3, 3, 5, kind="video"),
]


@pytest.mark.parametrize("sample", CASES, ids=lambda s: s.name)
def test_hf_and_packing_agree_alone(models, sample: Sample) -> None:
    hf, packing = models
    assert_close(extract_hf(hf, sample), extract_packing(packing, [sample])[0])


def test_packed_samples_equal_each_alone(models) -> None:
    _, packing = models
    packed = extract_packing(packing, CASES)
    for sample, features in zip(CASES, packed):
        assert_close(features, extract_packing(packing, [sample])[0])


def test_video_positions_matter(models) -> None:
    """The 64-frame protocol is not a no-op: frames at 0..T-1 give different features (fixture sensitivity)."""
    hf, _ = models
    sample = CASES[3]
    shifted = Sample(sample.name, "video", sample.pixels, sample.grid, list(range(8)))
    cos = torch.nn.functional.cosine_similarity(extract_hf(hf, sample), extract_hf(hf, shifted), dim=-1)
    assert cos.min().item() < 0.9


def test_rotate_pairs_and_inv_freq() -> None:
    x = torch.arange(6.0)
    assert rotate_pairs(x).tolist() == [-1.0, 0.0, -3.0, 2.0, -5.0, 4.0]
    inv_t, inv_h, inv_w = VisionRotary3D(head_dim=64, theta=10000.0).inv_freqs()
    assert (len(inv_t), len(inv_h), len(inv_w)) == (8, 12, 12)
    assert torch.allclose(inv_h, 1.0 / 10000.0 ** (torch.arange(12.0) / 12))


def test_rope_correct_after_meta_device_loading(models) -> None:
    """Frequencies are computed, never loaded: from_pretrained (meta init) gives the analytic table."""
    hf, packing = models
    for model in (hf, packing):
        assert not [name for name, _ in model.named_buffers()]
        cos, sin = model.rotary(torch.tensor([[3, 2, 1]]))
        assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
        inv_t, inv_h, inv_w = model.rotary.inv_freqs()
        f = torch.cat([3 * inv_t, 2 * inv_h, 1 * inv_w])
        assert torch.allclose(cos[0], torch.cat([f, f]).cos())


def test_save_and_load_round_trip(models, tmp_path) -> None:
    hf, packing = models
    sample = CASES[0]
    for model in (hf, packing):
        model.save_pretrained(tmp_path / type(model).__name__)
        again = load_model(tmp_path / type(model).__name__).model
        before = extract_hf(model, sample) if model is hf else extract_packing(model, [sample])[0]
        after = extract_hf(again, sample) if model is hf else extract_packing(again, [sample])[0]
        assert torch.equal(before, after)


def test_auto_classes_resolve(tmp_path) -> None:
    for model_type, cls in [("onevision_encoder", OneVisionEncoderModel), ("llava_vit", OneVisionEncoderModel),
                            ("onevision_encoder_packing", OneVisionEncoderPackingModel),
                            ("llava_vit_packing", OneVisionEncoderPackingModel)]:
        config = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=2, num_hidden_layers=1,
                                      intermediate_size=32)
        assert isinstance(AutoModel.from_config(config), cls)


def test_release_key_names_load_exactly(tmp_path) -> None:
    """A checkpoint written with the release's key names under the old model_type loads with no key problems."""
    state = load_file(str(BUILTIN_HF / "model.safetensors"))
    assert "encoder.layers.0.self_attn.q_proj.weight" in state and "head.attention.in_proj_weight" in state
    folder = tmp_path / "llava_vit"
    folder.mkdir()
    config = json.loads((BUILTIN_HF / "config.json").read_text())
    config["model_type"] = "llava_vit"
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    loaded = load_model(folder)
    assert loaded.side == "hf" and loaded.source == "vitparity"
    assert set(loaded.model.state_dict()) == set(state)


def test_converter_reproduces_committed_packing_checkpoint(tmp_path) -> None:
    convert_checkpoint(BUILTIN_HF, tmp_path / "packing")
    ours = load_file(str(tmp_path / "packing" / "model.safetensors"))
    committed = load_file(str(BUILTIN_PACKING / "model.safetensors"))
    assert ours.keys() == committed.keys()
    assert all(torch.equal(ours[k], committed[k]) for k in ours)
    back = packing_to_hf_state_dict(hf_to_packing_state_dict(load_file(str(BUILTIN_HF / "model.safetensors"))))
    original = load_file(str(BUILTIN_HF / "model.safetensors"))
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)


def test_qkv_fused_in_order() -> None:
    state = {f"encoder.layers.0.self_attn.{n}_proj.weight": torch.full((2, 2), float(i)) for i, n in enumerate("qkv")}
    fused = hf_to_packing_state_dict(state)["encoder.layers.0.self_attn.qkv.weight"]
    assert fused[:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def _copy_checkpoint(tmp_path, mutate) -> str:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((BUILTIN_HF / "config.json").read_text())
    state = load_file(str(BUILTIN_HF / "model.safetensors"))
    mutate(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda s: s.pop("encoder.layers.1.mlp.fc1.bias"), "missing"),
        (lambda s: s.update({"encoder.layers.9.extra.weight": torch.zeros(1)}), "unexpected"),
        (lambda s: s.update({"layernorm_pre.weight": torch.zeros(65)}), "layernorm_pre.weight"),
    ],
    ids=["missing-key", "unexpected-key", "wrong-shape"],
)
def test_loader_and_converter_refuse_bad_keys(tmp_path, mutate, words) -> None:
    folder = _copy_checkpoint(tmp_path, mutate)
    with pytest.raises(ModelLoadError, match=words):
        load_model(folder)
    with pytest.raises(ConversionError, match=words):
        convert_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remote_code_needs_opt_in(tmp_path) -> None:
    folder = _copy_checkpoint(tmp_path, lambda s: None)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="someone_elses_encoder", auto_map={"AutoModel": "modeling_x.XModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust-remote-code"):
        load_model(folder)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        OneVisionEncoderConfig(hidden_size=96, num_attention_heads=2)
    with pytest.raises(ValueError, match="layer_norm_type"):
        OneVisionEncoderPackingConfig(layer_norm_type="batch_norm")


def test_bad_inputs_are_named(models) -> None:
    hf, packing = models
    with pytest.raises(ValueError, match="multiples of patch_size"):
        hf(torch.zeros(1, 3, 15, 28))
    with pytest.raises(ValueError, match="grid_thw covers"):
        packing(torch.zeros(5, 588), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="visible_indices out of range"):
        hf(torch.zeros(1, 3, 2, 14, 14), visible_indices=torch.tensor([[0, 2]]))


def test_tiny_model_is_deterministic() -> None:
    a, b = make_tiny_hf_model(0), make_tiny_hf_model(0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_single_file_beside_an_index_is_ambiguous(tmp_path) -> None:
    """A stale index beside model.safetensors (a sharded checkpoint overwritten in place) is refused by name."""
    folder = _copy_checkpoint(tmp_path, lambda s: None)
    index = {"metadata": {}, "weight_map": {"head.probe": "model-00001-of-00009.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors and model\.safetensors\.index\.json"):
        load_model(folder)
    with pytest.raises(ConversionError, match="ambiguous"):
        convert_checkpoint(folder, tmp_path / "out")


# Early exit: the features of the project's own classes come from a forward that stops after the penultimate layer.


def _early_and_full(model: torch.nn.Module, samples: list[Sample], hf: bool) -> tuple[list, list]:
    if hf:
        return [extract_hf(model, s) for s in samples], [extract_hf(model, s, full_forward=True) for s in samples]
    return extract_packing(model, samples), extract_packing(model, samples, full_forward=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_early_exit_is_bit_identical_to_hidden_states_minus_2(dtype: torch.dtype) -> None:
    """Images and videos alone (non-packing) and packed together (packing): the same bits as the full forward."""
    hf, packing = load_model(BUILTIN_HF, dtype=dtype).model, load_model(BUILTIN_PACKING, dtype=dtype).model
    assert stops_early(hf) and stops_early(packing)
    for model, is_hf in ((hf, True), (packing, False)):
        early, full = _early_and_full(model, CASES, is_hf)
        assert len(early) == len(full) == len(CASES)
        for sample, a, b in zip(CASES, early, full):
            assert a.dtype == torch.float32 and a.shape == (sample.num_tokens, hf.config.hidden_size)
            assert torch.equal(a, b), f"{type(model).__name__} {sample.name} {dtype}"


def test_early_exit_skips_the_last_layer_and_the_head(models) -> None:
    """Only layers 0..L-2 run: the last layer, the post-norm and the head never see the input."""
    calls: list[str] = []
    for model in models:
        hooks = [module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
                 for name, module in model.named_modules() if name.startswith(("encoder.layers.", "head", "layernorm_post"))
                 and name.count(".") <= 2]
        try:
            sample = CASES[3]
            extract_hf(model, sample) if model is models[0] else extract_packing(model, [sample])
        finally:
            for hook in hooks:
                hook.remove()
        layers = model.config.num_hidden_layers
        assert calls == [f"encoder.layers.{i}" for i in range(layers - 1)], type(model).__name__
        calls.clear()


def test_output_layer_returns_each_hidden_state(models) -> None:
    """output_layer=k gives hidden_states[k] of the full forward for every k, negative ones included."""
    hf, packing = models
    sample = CASES[0]
    inputs = packing_inputs([sample], packing.config.patch_size, torch.float32)
    with torch.inference_mode():
        full = packing(**inputs, output_hidden_states=True).hidden_states
        for k in range(-len(full), len(full)):
            out = packing(**inputs, output_layer=k)
            assert torch.equal(out.last_hidden_state, full[k]) and out.pooler_output is None, k
        for k in (len(full), -len(full) - 1):
            with pytest.raises(ValueError, match=f"output_layer={k} is outside hidden_states"):
                hf(torch.zeros(1, 3, 14, 14), output_layer=k)


def test_subclasses_keep_output_hidden_states(models) -> None:
    """A subclass (remote code overriding forward without output_layer) runs the full forward with every hidden
    state; its features are those of its own forward."""
    hf, _ = models

    class OwnForward(OneVisionEncoderModel):
        def forward(self, pixel_values, visible_indices=None, patch_positions=None, output_hidden_states=None,
                    return_dict=None):
            outputs = super().forward(pixel_values, visible_indices, patch_positions, output_hidden_states, True)
            outputs.hidden_states = tuple(h * 2 for h in outputs.hidden_states)
            return outputs

    child = OwnForward(hf.config)
    child.load_state_dict(hf.state_dict())
    child.eval()
    assert not stops_early(child)
    sample = CASES[3]
    assert torch.equal(extract_hf(child, sample), 2 * extract_hf(hf, sample))
