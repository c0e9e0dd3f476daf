"""What the bench runs on: model configs, cases, synthetic media, and the two models with the same weights.

Models get random weights (no download): the non-packing model is built and initialised, and the packing model
receives the same weights through vitparity.convert. Inputs go through the project's extraction protocol
(vitparity.extract), so a timed forward is one `extract_hf` / `extract_packing` call.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from vitparity.convert import convert_config, hf_to_packing_state_dict
from vitparity.extract import Sample, extract_hf, extract_packing, prepare_sample
from vitparity.media import Media
from vitparity.models import OneVisionEncoderConfig, OneVisionEncoderModel, OneVisionEncoderPackingModel

from .common import Progress

CONFIGS = {
    "vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14),
    # SigLIP so400m has 16 heads of 72; the 3-D RoPE split needs head_dim % 32 == 0, so 18 heads of 64 here.
    "so400m": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=18, intermediate_size=4304, patch_size=14),
    "small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=14),
}
# name -> (kind, frames, height, width); sizes are the patch-aligned (crop) sizes of 480p / 720p / 1080p.
CASES = {
    "image-1080p": ("image", 1, 1078, 1918),
    "video-240p": ("video", 8, 238, 420),
    "video-480p": ("video", 8, 476, 854),
    "video-720p": ("video", 8, 714, 1274),
    "video-1080p": ("video", 8, 1078, 1918),
    "image-small": ("image", 1, 56, 70),
    "video-small": ("video", 8, 42, 56),
}
REAL_CASES = ["image-1080p", "video-480p", "video-720p", "video-1080p"]
SMALL_CASES = ["image-small", "video-small"]
# the suite-run file set: (file name, frames written, height, width); videos are sampled to 8 frames
SUITE_FILES = {
    "real": [("benchfile_a_image1.jpg", 1, 1080, 1920), ("benchfile_b_image2.jpg", 1, 1080, 1920),
             ("benchfile_c_video1.mp4", 48, 1080, 1920), ("benchfile_d_video2.mp4", 48, 1080, 1920)],
    "small": [("benchfile_a_image1.jpg", 1, 56, 70), ("benchfile_b_image2.jpg", 1, 56, 70),
              ("benchfile_c_video1.mp4", 12, 42, 56), ("benchfile_d_video2.mp4", 12, 42, 56)],
}


def case_tokens(case: str, patch_size: int) -> int:
    _, t, height, width = CASES[case]
    return t * (height // patch_size) * (width // patch_size)


def synthetic_frames(t: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 RGB (T, H, W, 3): smooth moving colour fields plus noise (no constant regions)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        base = np.stack([
            128 + 90 * np.sin(xx / 37.0 + i * 0.3) * np.cos(yy / 53.0),
            128 + 90 * np.sin((xx + yy) / 71.0 - i * 0.2),
            128 + 90 * np.cos(yy / 29.0 + i * 0.1) * np.sin(xx / 97.0),
        ], axis=-1)
        noise = rng.normal(0.0, 12.0, size=base.shape).astype(np.float32)
        frames[i] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return frames


def write_media(folder: Path, specs: list[tuple[str, int, int, int]], seed: int = 0, label: str = "media"
                ) -> list[Path]:
    """Write (name, frames, height, width) files with OpenCV: .jpg images, .mp4 (mp4v, 24 fps) videos; the file at
    position i gets the frames of seed + i. A file already there is kept: each is written under a temporary name
    and renamed when complete, so that an interrupted run leaves no partial file to be reused. A progress line per
    file on stderr, `[<label> files i/n] ...`."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with Progress(f"{label} files", len(specs)) as progress:
        for index, (name, t, height, width) in enumerate(specs):
            path = folder / name
            paths.append(path)
            if path.exists():
                progress.step(f"{name}: kept (already there)")
                continue
            progress.step(f"writing {name}: {t} frame(s) of {width}x{height}")
            partial = path.with_name(f".{path.stem}.partial{path.suffix}")
            try:
                _write_file(cv2, partial, synthetic_frames(t, height, width, seed + index))
                partial.replace(path)
            finally:
                partial.unlink(missing_ok=True)
    return paths


def _write_file(cv2, path: Path, frames: np.ndarray) -> None:
    if path.suffix == ".jpg":
        if not cv2.imwrite(str(path), cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise RuntimeError(f"cannot write {path}")
        return
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24.0, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot open a video writer for {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def make_sample(case: str, config, dtype: torch.dtype, device: torch.device, seed: int) -> Sample:
    kind, t, height, width = CASES[case]
    frames = synthetic_frames(t, height, width, seed)
    media = Media(f"synthetic-{case}", kind, frames[0] if kind == "image" else frames,
                  {"width": width, "height": height})  # the native size, as a decoder records it
    return prepare_sample(media, patch_size=config.patch_size, dtype=dtype, device=device,
                          temporal_context=config.rope_temporal_size, name=case)


def sharpen_weights(model: torch.nn.Module, seed: int, qk_gain: float = 2.5) -> None:
    """Fan-in scaled weights with q / k `qk_gain` times larger (sharp attention), norms perturbed around 1 / 0."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
            if param.dim() == 1 and "norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
                continue
            fan_in = param[0].numel() if param.dim() > 1 else param.shape[-1]
            gain = qk_gain if (".q_proj." in name or ".k_proj." in name) and name.endswith("weight") else 1.0
            param.copy_((gain / math.sqrt(fan_in) if param.dim() > 1 else 0.02) * noise)


def build_models(config_name: str, device: torch.device, dtype: torch.dtype, seed: int, init: str = "hf"):
    """The non-packing model with random weights and the packing model holding the same weights (convert)."""
    config = OneVisionEncoderConfig(**CONFIGS[config_name], rope_temporal_size=64)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = OneVisionEncoderModel(config)
    if init == "sharp":
        sharpen_weights(hf, seed)
    hf = hf.to(dtype).eval()
    with torch.device("meta"):
        packing = OneVisionEncoderPackingModel(convert_config(config))
    packing.load_state_dict(hf_to_packing_state_dict(hf.state_dict()), strict=True, assign=True)
    return hf, packing.eval()


def forward_fns(hf, packing, sample: Sample) -> dict:
    """The timed call of each side: the project's extraction protocol for one sample."""
    context = hf.config.rope_temporal_size
    return {"hf": lambda: extract_hf(hf, sample, temporal_context=context),
            "packing": lambda: extract_packing(packing, [sample])[0]}
