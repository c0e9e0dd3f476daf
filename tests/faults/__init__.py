"""Planted faults and benign variants of the built-in tiny checkpoints, to prove what the parity suite catches.

Every variant is a checkpoint folder the suite loads by path:
- code variants: the built-in checkpoint's config.json (plus `auto_map` and `planted_variant`) and byte-identical
  weight files, plus `modeling_planted.py`, whose model subclass plants the change. The architecture fields and
  weight bytes are unchanged, so the model fingerprint, and hence the golden folder, is that of the built-in model;
- weight variants: the built-in config and converted weights edited in place (a new fingerprint: no golden);
- config variants: the built-in weights with config.json fields changed, as a release's config would differ
  (`hidden_act`, `layer_norm_eps`: fields that change only the numerics, reported as warnings). They change the
  fingerprint, which hashes every architecture field, so no committed golden applies to them.
The suite runs code variants only with `--trust-remote-code`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vitparity.builtin import BUILTIN_HF, BUILTIN_PACKING
from vitparity.steps import STEP_WORDS

PLANTED_MODULE = Path(__file__).with_name("modeling_planted.py")
PLANTED_CLASSES = {"packing": "PlantedPackingModel", "hf": "PlantedHFModel"}
FAULT, BENIGN = "fault", "benign"
PATH_CASES = "video or codec"  # the cases whose forwards take explicit positions or sparse indices


@dataclass(frozen=True)
class Variant:
    """A small change to one side's checkpoint; `kind` says whether the suite must catch it."""

    name: str
    kind: str  # FAULT: at least one test must fail; BENIGN: every test must pass
    side: str  # "packing" or "hf": which checkpoint is replaced
    mechanism: str  # "code" (planted in modeling_planted.py), "weights" (edited tensors) or "config" (config.json)
    description: str
    config: tuple[tuple[str, object], ...] = ()  # config.json fields a "config" variant sets
    goldens: bool = True  # False: its runs leave the golden tests out, so the verdict comes from the other checks
    caught_by: tuple[str, ...] = ()  # test groups (detection.group_of) that must be among the failures, both dtypes
    select: str = ""  # a -m expression the suite runs under (a fault of one input path: the cases that take it)
    # The step the per-layer trace must name (`names_step`): "step key[: words of its cause]" of vitparity.steps,
    # "embedding" (layer 0), a pattern's name, or "none" (nothing diverges where the trace looks).
    step: str = "none"


VARIANTS = (
    Variant("rope_half_split", FAULT, "packing", "code",
            "RoPE rotates (first half, second half) pairs instead of neighbouring pairs",
            step="rope: (first half, second half) pairs"),
    Variant("rope_axes_swapped", FAULT, "packing", "code",
            "RoPE reads the h and w positions swapped",
            step="rope: h/w axes"),
    Variant("positions_ignored", FAULT, "packing", "code",
            "patch_positions ignored: video frames at 0..T-1 instead of the 64-frame positions",
            step="rope: t axis"),
    Variant("cross_sample_attention", FAULT, "packing", "code",
            "block-diagonal mask dropped: samples in one pack attend to each other",
            step="attention"),
    Variant("attention_scale", FAULT, "packing", "code",
            "attention scale 1/head_dim instead of 1/sqrt(head_dim)",
            step="attention: softmax scale 1/head_dim"),
    Variant("channels_last", FAULT, "packing", "code",
            "each (C*p*p) patch row read in (p, p, C) order",
            step="embedding"),
    Variant("qk_swapped", FAULT, "packing", "weights",
            "q and k blocks of every fused qkv weight and bias swapped",
            step="q: q and k exchanged"),
    Variant("hidden_states_shifted", FAULT, "packing", "code",
            "hidden_states one layer late (entry -2 is the last layer's output)",
            step="hidden_states shifted by one"),
    Variant("layer_missing", FAULT, "packing", "code",
            "layer 1 never runs although its weights load",
            step="layer count differs"),
    Variant("layer_removed", FAULT, "packing", "code",
            "layer 1 never runs and is left out of hidden_states (one hidden state fewer)",
            step="layer count differs"),
    Variant("clip_mean_std_swapped", FAULT, "hf", "code",
            "CLIP mean and std swapped on the non-packing side",
            step="embedding"),
    Variant("temporal_off_by_one", FAULT, "packing", "code",
            "video frame positions round(i/(T-1)*64) instead of round(i/(T-1)*63)",
            step="rope: t axis"),
    Variant("neighbour_leak_1e-6", FAULT, "packing", "code",
            "every hidden state of a packed sample gets 1e-6 x the mean of the other samples' tokens"),
    Variant("attention_scale_2pct", FAULT, "packing", "code",
            "attention scale 1.02/sqrt(head_dim) instead of 1/sqrt(head_dim)", caught_by=("test_parity",),
            step="attention"),
    Variant("feature_mlp_bias_dropped", FAULT, "packing", "weights",
            "MLP output bias of the layer that produces the features (the second-to-last) zeroed by the converter",
            goldens=False, caught_by=("test_parity",),
            step="fc2: the bias of encoder.layers.2.mlp.fc2"),
    Variant("weights_bf16_rounded", FAULT, "packing", "weights",
            "every packing weight rounded through bfloat16 by the converter (saved as float32)",
            goldens=False, caught_by=("test_parity",),
            step="layer_norm1: the weight of encoder.layers.0.layer_norm1"),
    Variant("features_doubled", FAULT, "packing", "code",
            "every hidden state twice as large (a layer scale folded in twice): cosine 1", caught_by=("test_parity",),
            step="embedding"),
    Variant("norm_gain_zeroed", FAULT, "packing", "weights",
            "layernorm_post gain (1-D, not on the features' path) all zeros in the checkpoint",
            goldens=False, caught_by=("test_loaded_weights[packing]",)),
    Variant("rope_buffer_wrong_axis", FAULT, "packing", "code",
            "RoPE kept in inv_freq_t/h/w buffers; inv_freq_h holds the t axis's frequencies (each value a RoPE "
            "frequency of some axis)", caught_by=("test_loaded_weights[packing]",),
            step="rope"),
    Variant("loaded_bias_one_element", FAULT, "packing", "code",
            "the loader changes one element of layernorm_post.bias (not on the features' path) by 0.5 after "
            "loading", caught_by=("test_loaded_weights[packing]",)),
    Variant("gelu_tanh", BENIGN, "packing", "code",
            "GELU with the tanh approximation"),
    Variant("attention_fp32", BENIGN, "packing", "code",
            "packed attention computed in float32 and cast back to the input dtype"),
    Variant("rope_input_dtype", BENIGN, "packing", "code",
            "RoPE applied in the input dtype instead of float32"),
    Variant("layer_norm_eps_1e-5", BENIGN, "packing", "code",
            "every norm with eps 1e-5 instead of the config's 1e-6 (config.json unchanged)"),
    Variant("positions_hw_swapped", FAULT, "hf", "code",
            "explicit patch_positions read as (t, w, h) (path 2 only)", select=PATH_CASES),
    Variant("positions_temporal_dropped", FAULT, "hf", "code",
            "the temporal position of explicit patch_positions dropped (t = 0; path 2 only)", select=PATH_CASES),
    Variant("sparse_positions_sorted", FAULT, "hf", "code",
            "RoPE positions of sparse visible_indices taken in sorted order, apart from their tokens (path 3 only)",
            select=PATH_CASES),
    Variant("mosaic_column_major", FAULT, "hf", "code",
            "frames given with explicit patch_positions read column by column (path 2 only)", select=PATH_CASES),
    Variant("sparse_gather_after_prenorm", BENIGN, "hf", "code",
            "visible tokens gathered after layernorm_pre (every patch embedded and normed first), as the release "
            "does", select=PATH_CASES),
    Variant("config_gelu_tanh", BENIGN, "packing", "config",
            "config.json says hidden_act gelu_pytorch_tanh (hf: gelu), as a release with a fused tanh GELU would",
            config=(("hidden_act", "gelu_pytorch_tanh"),)),
    Variant("config_layer_norm_eps_1e-5", BENIGN, "packing", "config",
            "config.json says layer_norm_eps 1e-5 (hf: 1e-6)", config=(("layer_norm_eps", 1e-5),)),
)
# Faults below any cosine threshold: only the suite's bit-exact companion swap (test_companions_do_not_leak)
# catches them.
BIT_EXACT_FAULTS = ("neighbour_leak_1e-6",)
VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}
CONFIG_VARIANTS = tuple(variant for variant in VARIANTS if variant.mechanism == "config")


def names_step(divergence: str, expected: str) -> bool:
    """Whether a first divergence in words (vitparity.trace.divergence_words) names `expected` (`Variant.step`):
    the step's words (vitparity.steps.STEP_WORDS; "embedding": layer 0; else a pattern's name or "none") and the
    words of its cause where given."""
    if expected == "none":
        return divergence == "none"
    step, _, words = expected.partition(": ")
    lead = STEP_WORDS.get(step, "layer 0 (the embedding output)" if step == "embedding" else step)
    return lead in divergence and words in divergence


def builtin_folder(side: str) -> Path:
    return BUILTIN_HF if side == "hf" else BUILTIN_PACKING


def _copy_checkpoint(source: Path, folder: Path) -> dict:
    """Copy config.json and the weight files byte for byte; return the config."""
    folder.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.name == "config.json" or path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            shutil.copyfile(path, folder / path.name)
    return json.loads((source / "config.json").read_text())


def _swap_q_and_k(tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Swap the q and k row blocks of every `self_attn.qkv` weight and bias (a pure weight change)."""
    for name, tensor in tensors.items():
        if ".self_attn.qkv." in name:
            q, k, v = tensor.chunk(3, dim=0)
            tensors[name] = torch.cat([k, q, v], dim=0).contiguous()


def _drop_feature_bias(tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Zero the fc2 bias of the layer whose output is the features (hidden_states[-2]: the second-to-last)."""
    name = f"encoder.layers.{config['num_hidden_layers'] - 2}.mlp.fc2.bias"
    tensors[name] = torch.zeros_like(tensors[name])


def _round_through_bf16(tensors: dict[str, torch.Tensor], config: dict) -> None:
    for name, tensor in tensors.items():
        tensors[name] = tensor.to(torch.bfloat16).to(tensor.dtype)


def _zero_post_norm_gain(tensors: dict[str, torch.Tensor], config: dict) -> None:
    tensors["layernorm_post.weight"] = torch.zeros_like(tensors["layernorm_post.weight"])


WEIGHT_EDITS = {
    "qk_swapped": _swap_q_and_k,
    "feature_mlp_bias_dropped": _drop_feature_bias,
    "weights_bf16_rounded": _round_through_bf16,
    "norm_gain_zeroed": _zero_post_norm_gain,
}


def _edit_weights(folder: Path, edit, config: dict) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors, config)
    save_file(tensors, str(path), metadata={"format": "pt"})


def build_variant(variant: Variant | str, root: Path) -> Path:
    """Write the variant's checkpoint folder `root/<name>` and return it."""
    variant = VARIANTS_BY_NAME[variant] if isinstance(variant, str) else variant
    folder = Path(root) / variant.name
    config = _copy_checkpoint(builtin_folder(variant.side), folder)
    if variant.mechanism == "weights":
        if variant.name not in WEIGHT_EDITS:
            raise ValueError(f"no weight edit for {variant.name}")
        _edit_weights(folder, WEIGHT_EDITS[variant.name], config)
        return folder
    if variant.mechanism == "config":
        config.update(dict(variant.config))
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return folder
    shutil.copyfile(PLANTED_MODULE, folder / PLANTED_MODULE.name)
    config["auto_map"] = {"AutoModel": f"{PLANTED_MODULE.stem}.{PLANTED_CLASSES[variant.side]}"}
    config["planted_variant"] = variant.name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def suite_args(variant: Variant, folder: Path, dtype: str, *, golden_dir: Path, report_dir: Path) -> list[str]:
    """Options of a parity-suite run with the variant in place of its side's built-in checkpoint."""
    hf = folder if variant.side == "hf" else BUILTIN_HF
    packing = folder if variant.side == "packing" else BUILTIN_PACKING
    # A config variant is another model (its config is in the golden fingerprint): no committed golden is its own,
    # so its runs judge parity, determinism and the weights only.
    goldens = ["-m", "not golden"] if variant.mechanism == "config" or not variant.goldens else []
    if variant.select:
        goldens = ["-m", f"({variant.select})" + (" and not golden" if goldens else "")]
    return [
        "--hf-model", str(hf), "--packing-model", str(packing), "--trust-remote-code",
        "--dtype", dtype, "--device", "cpu", "--golden-dir", str(golden_dir), "--report-dir", str(report_dir),
        *goldens,
    ]


def load_variant_models(variant: Variant | str, root: Path, dtype: torch.dtype = torch.float32):
    """(hf, packing) models with the variant in place of its side's built-in model, on the CPU.

    Code variants are built from their planted classes directly (the code their checkpoint folder runs by
    remote code), so no checkpoint code is copied into the transformers modules cache.
    """
    from vitparity.loading import load_model

    from .modeling_planted import PlantedHFModel, PlantedPackingModel

    variant = VARIANTS_BY_NAME[variant] if isinstance(variant, str) else variant
    folder = build_variant(variant, root)
    if variant.mechanism == "code":
        planted = PlantedPackingModel if variant.side == "packing" else PlantedHFModel
        model = planted.from_pretrained(folder, dtype=dtype).eval()
    else:
        model = load_model(folder, dtype=dtype).model
    other = load_model(builtin_folder("hf" if variant.side == "packing" else "packing"), dtype=dtype).model
    return (other, model) if variant.side == "packing" else (model, other)
