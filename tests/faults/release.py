"""Planted faults in checkpoints that carry release-format code of their own (tests/remote/release), for what only
the code rule, the reference and the outputs after the penultimate layer can catch.

Each variant is a pair of checkpoint folders (hf, packing): the built-in weights with the release-format code, one
thing planted in the code (both checkpoints' copies of a shared file for a common-mode fault) or in the weights.
`failing` names the tests that must fail (by name, case id left out); every other selected test must pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from remote import release_checkpoint
from vitparity.loading import rope_buffer_keys
from vitparity.models.layers import VisionRotary3D

HF_FILE = "modeling_onevision_encoder.py"
PACKING_FILE = "modeling_onevision_encoder_packing.py"
# RoPE of the shared rotary class with the h and w axes swapped: both release files use it.
SHARED_ROPE_AXES = (HF_FILE, "        positions = positions.float()\n",
                    "        positions = positions.float()[..., [0, 2, 1]]\n")
HEAD_NEGATED = (PACKING_FILE, "            x = self.layernorm_post(x)\n", "            x = -self.layernorm_post(x)\n")
# The shared rotary class registers its tables persistent (a copy patched to survive meta-device loading): both
# models keep them in their state dicts and both checkpoints save them.
ROPE_BUFFERS_PERSISTENT = (HF_FILE, 'self.register_buffer(f"inv_freq_{axis}", inv, persistent=False)',
                           'self.register_buffer(f"inv_freq_{axis}", inv, persistent=True)')
# The hf attention adds half of the next row's values when given a batch of two or more: one sample at a time, as
# every check but test_batch runs it, it is exact.
BATCH_ROWS_MIXED = (HF_FILE, "        cos, sin = cos.to(q.dtype), sin.to(q.dtype)\n",
                    "        cos, sin = cos.to(q.dtype), sin.to(q.dtype)\n"
                    "        v = v + 0.5 * v.roll(1, dims=0) if b > 1 else v\n")
# The packing model's own positions (grid_thw given alone) read (t, w, h): the explicit positions every other check
# passes bypass it.
GRID_PATH_HW_SWAPPED = (PACKING_FILE, 'indexing="ij"),\n                                dim=-1).reshape(-1, 3) for',
                        'indexing="ij"),\n                                dim=-1).reshape(-1, 3)[:, [0, 2, 1]] for')
# The hf model's RoPE rows clamped at h = 31: only media past the 32-patch pretraining grid on the h axis meet it.
ROPE_H_CLAMPED = (HF_FILE, "        cos, sin = self.video_rope(patch_positions)\n",
                  "        patch_positions = torch.cat([patch_positions[..., :1], patch_positions[..., 1:2].clamp(max=31), "
                  "patch_positions[..., 2:]], dim=-1)\n        cos, sin = self.video_rope(patch_positions)\n")
ROPE_INPUT_DTYPE = (PACKING_FILE, "q = (q.float() * cos + rotate_pairs(q.float()) * sin).to(x.dtype)",
                    "q = q * cos.to(q.dtype) + rotate_pairs(q) * sin.to(q.dtype)")


@dataclass(frozen=True)
class ReleaseVariant:
    name: str
    description: str
    failing: frozenset[str]  # test names that must fail; empty: every selected test passes
    edits: tuple[tuple[str, str, str], ...] = ()  # (file, old, new) planted in both checkpoints' copies
    last_layer_qk_swapped: bool = False  # the packing checkpoint's last layer converted with q and k swapped
    rope_buffers_saved: bool = False  # both checkpoints' files carry the RoPE tables (the formula, float32)
    step: str = "none"  # the step each traced side's first divergence must name (faults.Variant.step, names_step)
    select: str = ""  # more tests its runs select (a -k alternative), beside the two image cases
    failing_gpu_plan: frozenset[str] | None = None  # what fails under the GPU plan where it differs from `failing`

    def must_fail(self, plan: str) -> frozenset[str]:
        """The test names that must fail under `plan` ("cpu-plan" or "gpu-plan")."""
        return self.failing_gpu_plan if plan == "gpu-plan" and self.failing_gpu_plan is not None else self.failing

    @property
    def kind(self) -> str:
        """`fault` when a test must fail, else `benign` (the detection table's column)."""
        return "fault" if self.failing else "benign"

    @property
    def side(self) -> str:
        """Where it is planted: `both` (a file both checkpoints carry), `packing`, or `-` (nothing planted)."""
        files = {file for file, _, _ in self.edits}
        if HF_FILE in files:
            return "both"
        return "packing" if files or self.last_layer_qk_swapped else "-"


RELEASE_VARIANTS = (
    ReleaseVariant("clean", "the release-format code as written", frozenset()),
    ReleaseVariant("clean_buffers_saved", "the release-format code with persistent RoPE buffers, saved in both files",
                   frozenset(), edits=(ROPE_BUFFERS_PERSISTENT,), rope_buffers_saved=True),
    ReleaseVariant("clean_buffers_in_files", "the release-format code as written, both files carrying the RoPE buffers",
                   frozenset(), rope_buffers_saved=True),
    ReleaseVariant("rope_input_dtype", "numerics only: the packing file applies RoPE in the input dtype",
                   frozenset(), edits=(ROPE_INPUT_DTYPE,)),
    ReleaseVariant("rope_input_dtype_buffers_saved", "numerics only, persistent RoPE buffers saved in both files",
                   frozenset(), edits=(ROPE_INPUT_DTYPE, ROPE_BUFFERS_PERSISTENT), rope_buffers_saved=True),
    ReleaseVariant("shared_rope_axes", "common mode: the RoPE class both files use reads h and w swapped",
                   frozenset({"test_reference"}), edits=(SHARED_ROPE_AXES,), step="rope: h/w axes"),
    ReleaseVariant("last_layer_qk_swapped", "the packing checkpoint's last layer has q and k swapped in conversion",
                   frozenset({"test_outputs", "test_converted_weights"}), last_layer_qk_swapped=True),
    ReleaseVariant("head_negated", "the packing file negates the post-norm (and so the pooling head's input)",
                   frozenset({"test_outputs"}), edits=(HEAD_NEGATED,)),
    ReleaseVariant("batch_rows_mixed", "batch-only: the hf attention mixes rows of a batch of two or more",
                   frozenset({"test_batch"}), edits=(BATCH_ROWS_MIXED,)),
    ReleaseVariant("grid_path_hw_swapped", "grid path only: the packing model given grid_thw alone reads (t, w, h)",
                   frozenset({"test_packing_grid_call"}), edits=(GRID_PATH_HW_SWAPPED,), select="grid_call"),
    ReleaseVariant("rope_h_clamped", "past the grid only: the hf RoPE rows clamped at h = 31 (the 32-patch grid)",
                   frozenset({"test_parity", "test_outputs", "test_reference"}), edits=(ROPE_H_CLAMPED,),
                   failing_gpu_plan=frozenset({"test_parity", "test_outputs"}), step="rope"),
)


def _swap_last_layer_qk(folder: Path) -> None:
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    last = max(int(key.split(".")[2]) for key in weights if key.startswith("encoder.layers."))
    for kind in ("weight", "bias"):
        key = f"encoder.layers.{last}.self_attn.qkv.{kind}"
        q, k, v = weights[key].chunk(3, dim=0)
        weights[key] = torch.cat([k, q, v]).contiguous()
    save_file(weights, str(path), metadata={"format": "pt"})


def _save_rope_buffers(folder: Path, side: str) -> None:
    """Add the release's RoPE tables (`loading.rope_buffer_keys`, the formula in float32) to a checkpoint's file."""
    path = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    tables = VisionRotary3D(config["hidden_size"] // config["num_attention_heads"], config["rope_theta"]).inv_freqs()
    weights = load_file(str(path))
    weights.update({key: table.contiguous() for key, table in zip(rope_buffer_keys(side), tables)})
    save_file(weights, str(path), metadata={"format": "pt"})


def build_release_variant(variant: ReleaseVariant, root: Path) -> tuple[Path, Path]:
    """The variant's (hf, packing) checkpoint folders under root/<name>/."""
    edits: dict[str, list[tuple[str, str]]] = {}
    for file, old, new in variant.edits:
        edits.setdefault(file, []).append((old, new))
    hf_edits = {file: pairs for file, pairs in edits.items() if file != PACKING_FILE}
    hf = release_checkpoint("hf", root / variant.name / "hf", hf_edits)
    packing = release_checkpoint("packing", root / variant.name / "packing", edits)
    if variant.last_layer_qk_swapped:
        _swap_last_layer_qk(packing)
    if variant.rope_buffers_saved:
        _save_rope_buffers(hf, "hf")
        _save_rope_buffers(packing, "packing")
    return hf, packing
