"""Noise of the packing vs non-packing features, and how far small faults move them: the figures behind the
precision bars' defaults (vitparity.precision, docs/detection.md "Precision bars").

`python -m bench.precision_noise [--config vit-l] [--height 336 --width 448] [--dtypes float32,bfloat16]` builds the
two models with the same trained-like weights (`--init sharp`: biases and norm gains away from 0 and 1, see
bench.workloads.sharpen_weights), runs one synthetic image through each, then plants each numerics-only variant and
each fault in the packing model in turn (undone after its forward) and prints one row per variant: min cosine,
mean (1 - cos), largest per-token norm gap, max abs difference. Every figure is a float32 comparison of the
penultimate-layer features, on the CPU.

For a 16-bit dtype it also prints the error ratio against a float32 run of the hf model: |packing - hf32| over
|hf - hf32|, the per-token relative L2 error, mean over tokens (the alternative to the float32 probe).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from vitparity.compare import compare_features
from vitparity.extract import extract_hf, extract_packing, prepare_sample
from vitparity.media import Media
from vitparity.models.layers import EncoderMLP

from .workloads import build_models, synthetic_frames


@contextmanager
def _set(objects: list, name: str, value) -> Iterator[None]:
    saved = [getattr(obj, name) for obj in objects]
    for obj in objects:
        setattr(obj, name, value(getattr(obj, name)) if callable(value) and not isinstance(value, nn.Module) else value)
    try:
        yield
    finally:
        for obj, old in zip(objects, saved):
            setattr(obj, name, old)


@contextmanager
def _saved_parameters(model: nn.Module) -> Iterator[None]:
    saved = copy.deepcopy(model.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(saved)


def variants(model: nn.Module) -> dict[str, tuple[str, Callable]]:
    """name -> (kind, context manager factory planting it in the packing `model`)."""
    layers = list(model.encoder.layers)
    mlps = [m for m in model.modules() if isinstance(m, EncoderMLP)]
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    attentions = [layer.self_attn for layer in layers]
    feature_layer = layers[-2]  # hidden_states[-2] is this layer's output

    @contextmanager
    def bias_dropped():
        with _saved_parameters(model), torch.no_grad():
            feature_layer.mlp.fc2.bias.zero_()
            yield

    @contextmanager
    def bf16_weights():
        with _saved_parameters(model), torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
            yield

    @contextmanager
    def nothing():
        yield

    return {
        "clean": ("benign", nothing),
        "gelu_tanh": ("benign", lambda: _set(mlps, "act", nn.GELU(approximate="tanh"))),
        "layer_norm_eps_1e-5": ("benign", lambda: _set(norms, "eps", 1e-5)),
        "attention_scale_2pct": ("fault", lambda: _set(attentions, "scale", lambda s: s * 1.02)),
        "feature_mlp_bias_dropped": ("fault", bias_dropped),
        "weights_bf16_rounded": ("fault", bf16_weights),
        "features_doubled": ("fault", nothing),  # applied to the output below
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit-l")
    parser.add_argument("--init", default="sharp", choices=("hf", "sharp"))
    parser.add_argument("--height", type=int, default=336)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    frames = synthetic_frames(1, args.height, args.width, args.seed)
    media = Media("synthetic", "image", frames[0], {"width": args.width, "height": args.height})
    reference = None
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf, packing = build_models(args.config, torch.device("cpu"), dtype, args.seed, init=args.init)
        sample = prepare_sample(media, patch_size=hf.config.patch_size, dtype=dtype, device="cpu",
                                temporal_context=hf.config.rope_temporal_size, name="synthetic")
        print(f"{args.config} init {args.init}, {dtype_name}, cpu, {sample.num_tokens} tokens "
              f"({args.height}x{args.width}), seed {args.seed}, {torch.get_num_threads()} threads", flush=True)
        with torch.inference_mode():
            start = time.perf_counter()
            hf_features = extract_hf(hf, sample, temporal_context=hf.config.rope_temporal_size).float()
            print(f"hf forward {time.perf_counter() - start:.1f} s", flush=True)
            if dtype == torch.float32:
                reference = hf_features
            hf_error = None
            if reference is not None and dtype != torch.float32:
                hf_error = _rel_error(hf_features, reference)
                print(f"hf {dtype_name} vs hf float32: mean per-token relative L2 error {hf_error:.3e}")
            print("variant | kind | min cos | mean 1-cos | norm gap | max abs | error ratio vs hf32")
            for name, (kind, plant) in variants(packing).items():
                if args.only and name not in args.only.split(","):
                    continue
                with plant():
                    features = extract_packing(packing, [sample])[0].float()
                if name == "features_doubled":
                    features = 2 * features
                c = compare_features(hf_features, features)
                ratio = f"{_rel_error(features, reference) / hf_error:.3f}" if hf_error else "-"
                print(f"{name} | {kind} | {c.min_cos:.9f} | {c.cos_gap:.3e} | {c.norm_gap:.3e} | {c.max_abs:.3e} | "
                      f"{ratio}", flush=True)
        del hf, packing
    return 0


def _rel_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over tokens of |x - reference| / |reference| (L2 per token)."""
    return float(((x - reference).norm(dim=-1) / reference.norm(dim=-1)).mean())


if __name__ == "__main__":
    raise SystemExit(main())
