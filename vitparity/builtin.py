"""The built-in tiny checkpoints: small enough for CPU CI, with weights sharp enough to expose faults.

Their folders are known without torch (the suite's options and the CLI name them before torch loads); torch and the
models load only to make the tiny model."""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import OneVisionEncoderModel


def _package_folder(package: str) -> Path:
    """The folder of an installed package's data (the build maps the repository's fixtures/ to vitparity.fixtures;
    an editable install maps the same folder). Raises RuntimeError for an install that is not a folder (a zip)."""
    folder = files(package)
    if not isinstance(folder, Path):
        raise RuntimeError(f"{package} is installed as {folder!r}, not a folder: install vitparity from its wheel")
    return folder


FIXTURES_DIR = _package_folder("vitparity.fixtures")
BUILTIN_GOLDEN = FIXTURES_DIR / "golden"
BUILTIN_HF = FIXTURES_DIR / "models" / "tiny-onevision-encoder"
BUILTIN_PACKING = FIXTURES_DIR / "models" / "tiny-onevision-encoder-packing"
BUILTIN_MEDIA = FIXTURES_DIR / "media"

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    patch_size=14,
    rope_temporal_size=64,
)
QK_GAIN = 2.5  # q / k weights this many times the fan-in scale: attention logits of order gain**2, so sharp


def make_tiny_hf_model(seed: int = 0) -> OneVisionEncoderModel:
    """A deterministic random tiny non-packing model; every weight drawn, norms perturbed around 1 / 0."""
    import torch

    from .models import OneVisionEncoderConfig, OneVisionEncoderModel

    model = OneVisionEncoderModel(OneVisionEncoderConfig(**TINY_CONFIG)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name):
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=gen))
                continue
            fan_in = param[0].numel() if param.dim() > 1 else param.shape[-1]
            gain = QK_GAIN if (".q_proj." in name or ".k_proj." in name) and name.endswith("weight") else 1.0
            std = gain / math.sqrt(fan_in) if param.dim() > 1 else 0.02
            param.copy_(std * torch.randn(param.shape, generator=gen))
    return model


def builtin_paths() -> tuple[Path, Path]:
    """(HF, packing) built-in checkpoint folders; a clear error when the repository's fixtures are absent."""
    for path in (BUILTIN_HF, BUILTIN_PACKING):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"built-in checkpoint {path} not found: reinstall vitparity (its wheel carries the built-in "
                "models) or pass model paths explicitly"
            )
    return BUILTIN_HF, BUILTIN_PACKING


def _write_builtin_checkpoints() -> None:
    """Regenerate fixtures/models (python -m vitparity.builtin)."""
    from .convert import convert_checkpoint

    make_tiny_hf_model().save_pretrained(BUILTIN_HF)
    convert_checkpoint(BUILTIN_HF, BUILTIN_PACKING)


if __name__ == "__main__":
    _write_builtin_checkpoints()
    print(f"wrote {BUILTIN_HF} and {BUILTIN_PACKING}")
