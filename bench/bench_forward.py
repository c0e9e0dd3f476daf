#!/usr/bin/env python
"""Real-size forward benchmark of both encoders, the suite's overhead and a whole parity run.

    python bench/bench_forward.py [--device cuda] [--dtype bfloat16] [--config vit-l|so400m]
                                  [--cases image-1080p video-480p ...] [--repeats N]
    python bench/bench_forward.py --small            # tiny config and inputs, runs on CPU in seconds

Models get random weights (no download): the non-packing model is built and initialised, and the
packing model receives the same weights through vitparity.convert. Inputs go through the project's
extraction protocol (vitparity.extract), so the timed region per forward is `extract_hf` /
`extract_packing` (the 64-frame context and visible indices, patchify and positions included).

Sections (each can be skipped):
  forward     per case: tokens, median wall time per forward (CUDA events after warm-up), peak GPU memory,
              achieved TFLOP/s and time over the FLOP floor, host syncs seen in a forward, bf16 parity
  attention   the attention kernels alone at each case's size (dense SDPA kernels, packed backends)
  overhead    what the suite adds around the forwards for one 1080p video file (decode, hash, normalise,
              patchify / positions / 64-frame scatter, device-to-host copy, comparison)
  parity-run  a fresh process that loads both checkpoints from disk and runs the parity protocol on two
              1080p images and two 8-frame 1080p videos written with OpenCV (load and decode included)

FLOPs counted: per layer the linear layers (q, k, v, out, fc1, fc2) and attention (QK^T and PV, 4*n^2*D
per sample of n tokens); the patch embedding and the pooling head are left out (under 1%). Multiply-add
= 2 FLOPs. The floor is FLOPs / --floor-tflops (default 795 TFLOP/s, the bf16 matrix rate the model
facts use for an H100; the nominal dense bf16 peak is 989 TFLOP/s).
"""

from __future__ import annotations

import time as _time

_T_SCRIPT = _time.perf_counter()  # before the heavy imports: the parity run reports its import time

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitparity.convert import convert_config, hf_to_packing_state_dict  # noqa: E402
from vitparity.extract import extract_hf, extract_packing, patchify, prepare_sample, token_positions  # noqa: E402
from vitparity.media import Media  # noqa: E402
from vitparity.models import OneVisionEncoderConfig, OneVisionEncoderModel, OneVisionEncoderPackingModel  # noqa: E402
from vitparity.models import layers as model_layers  # noqa: E402
from vitparity.models import packed_attention as pa  # noqa: E402

CONFIGS = {
    "vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14),
    # SigLIP so400m has 16 heads of 72; the 3-D RoPE split needs head_dim % 32 == 0, so 18 heads of 64 here.
    "so400m": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=18, intermediate_size=4304, patch_size=14),
    "small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=14),
}
# name -> (kind, frames, height, width); sizes are the patch-aligned (crop) sizes of 480p / 720p / 1080p.
CASES = {
    "image-1080p": ("image", 1, 1078, 1918),
    "video-480p": ("video", 8, 476, 854),
    "video-720p": ("video", 8, 714, 1274),
    "video-1080p": ("video", 8, 1078, 1918),
    "image-small": ("image", 1, 56, 70),
    "video-small": ("video", 8, 42, 56),
}
REAL_CASES = ["image-1080p", "video-480p", "video-720p", "video-1080p"]
SMALL_CASES = ["image-small", "video-small"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1024**3


# ----------------------------------------------------------------------------------------------- helpers


def log(*parts) -> None:
    print(*parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "varlen_attn": pa._has_varlen(),
        "flash_attn": pa._has_flash_attn(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / GIB, 1),
            sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["device"] = "cpu"
    return info


def model_flops(config, lengths: list[int]) -> float:
    """Linear layers and attention of every encoder layer for packed samples of the given token counts."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = sum(lengths)
    linear = 2 * n * (4 * d * d + 2 * d * inter)
    attention = sum(4 * m * m * d for m in lengths)
    return float(layers * (linear + attention))


def synthetic_frames(t: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 RGB (T, H, W, 3): smooth moving colour fields plus noise (no constant regions)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        base = np.stack(
            [
                128 + 90 * np.sin(xx / 37.0 + i * 0.3) * np.cos(yy / 53.0),
                128 + 90 * np.sin((xx + yy) / 71.0 - i * 0.2),
                128 + 90 * np.cos(yy / 29.0 + i * 0.1) * np.sin(xx / 97.0),
            ],
            axis=-1,
        )
        noise = rng.normal(0.0, 12.0, size=base.shape).astype(np.float32)
        frames[i] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return frames


def make_sample(case: str, config, dtype, device, seed: int):
    kind, t, height, width = CASES[case]
    frames = synthetic_frames(t, height, width, seed)
    media = Media(f"synthetic-{case}", kind, frames[0] if kind == "image" else frames, {})
    return prepare_sample(
        media, patch_size=config.patch_size, dtype=dtype, device=device,
        temporal_context=config.rope_temporal_size, name=case,
    )


def sharpen_weights(model: torch.nn.Module, seed: int, qk_gain: float = 2.5) -> None:
    """Fan-in scaled weights with q / k `qk_gain` times larger (sharp attention), norms perturbed around 1 / 0."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
                param.copy_(base + 0.1 * noise)
                continue
            fan_in = param[0].numel() if param.dim() > 1 else param.shape[-1]
            gain = qk_gain if (".q_proj." in name or ".k_proj." in name) and name.endswith("weight") else 1.0
            std = gain / math.sqrt(fan_in) if param.dim() > 1 else 0.02
            param.copy_(std * torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32))


def build_models(config_name: str, device: torch.device, dtype: torch.dtype, seed: int, init: str):
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


class ForwardClock:
    """CUDA events (or host clocks) around every model.forward, via hooks: forward time inside a larger call."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.pairs: list = []
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self._mark(start=True)),
            model.register_forward_hook(lambda *_: self._mark(start=False)),
        ]

    def _mark(self, start: bool) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        if start:
            self.pairs.append([event, None])
        else:
            self.pairs[-1][1] = event

    def total(self) -> float:
        """Seconds spent in forwards so far (synchronises)."""
        sync(self.device)
        if self.device.type == "cuda":
            return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0
        return sum(b - a for a, b in self.pairs)

    def reset(self) -> None:
        self.pairs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def time_region(fn, device: torch.device, warmup: int, repeats: int):
    """Median and all seconds of `fn()` after `warmup` calls (CUDA events on CUDA), and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
        del out
    sync(device)
    times = []
    for _ in range(repeats):
        out = None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


@contextmanager
def peak_memory(device: torch.device, result: dict):
    if device.type != "cuda":
        yield
        result.update(peak_gib=None, extra_gib=None)
        return
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    result.update(peak_gib=peak / GIB, extra_gib=(peak - base) / GIB)


SYNC_MESSAGES: dict[str, int] = {}


def count_syncs(fn, device: torch.device) -> int | None:
    """How many synchronising CUDA calls torch reports during fn() (set_sync_debug_mode), None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    # torch's one-time notice ("Synchronization debug mode is a prototype feature ...") is no sync
    found = [str(w.message) for w in caught
             if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    for message in found:
        SYNC_MESSAGES[message[:300]] = SYNC_MESSAGES.get(message[:300], 0) + 1
    return len(found)


def parity_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    """min / mean per-token cosine and max / mean |a - b|, in float64 on the tensors' device."""
    a64, b64 = a.double(), b.double()
    cos = F.cosine_similarity(a64, b64, dim=-1)
    diff = (a64 - b64).abs()
    return {
        "min_cos": cos.min().item(),
        "mean_cos": cos.mean().item(),
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
    }


def fmt(value, spec: str = ".3f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    log("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in rows:
        log("  ".join(c.rjust(w) for c, w in zip(row, widths)))


# ----------------------------------------------------------------------------------------------- sections


def run_forward(args, device, dtype, hf, packing, results: dict) -> None:
    config = hf.config
    rows, prow = [], []
    for index, case in enumerate(args.cases):
        sample = make_sample(case, config, dtype, device, seed=100 + index)
        tokens = sample.num_tokens
        flops = model_flops(config, [tokens])
        floor = flops / (args.floor_tflops * 1e12)
        entry = {"case": case, "tokens": tokens, "grid": list(sample.grid), "flops": flops, "floor_s": floor}
        outputs = {}
        for side, fn in (
            ("hf", lambda: extract_hf(hf, sample, temporal_context=config.rope_temporal_size)),
            ("packing", lambda: extract_packing(packing, [sample])[0]),
        ):
            mem: dict = {}
            with peak_memory(device, mem):
                median, times, out = time_region(fn, device, args.warmup, args.repeats)
            outputs[side] = out
            entry[side] = {
                "median_s": median,
                "times_s": times,
                "tflops": flops / median / 1e12,
                "x_floor": median / floor,
                **mem,
                "host_syncs": count_syncs(fn, device),
            }
            r = entry[side]
            log(
                f"  {case:12s} {side:8s} {tokens:7d} tok  {median:.4f} s  {r['tflops']:7.1f} TFLOP/s  "
                f"x{r['x_floor']:.2f} floor  peak {fmt(r['peak_gib'], '.2f')} GiB  syncs {r['host_syncs']}"
            )
        entry["parity"] = parity_stats(outputs["hf"], outputs["packing"])
        del outputs
        results["forward"].append(entry)
        for side in ("hf", "packing"):
            r = entry[side]
            rows.append([
                case, side, f"{tokens}", f"{r['median_s']:.4f}", f"{floor:.4f}", f"{r['x_floor']:.2f}",
                f"{r['tflops']:.1f}", fmt(r["peak_gib"], ".2f"), fmt(r["extra_gib"], ".2f"), str(r["host_syncs"]),
            ])
        p = entry["parity"]
        prow.append([case, f"{tokens}", f"{p['min_cos']:.6f}", f"{p['mean_cos']:.6f}", f"{p['max_abs']:.4g}",
                     f"{p['mean_abs']:.4g}"])
        sample = None
    results["forward_table"] = rows
    log(f"\nForward (extraction protocol), {results['machine']['device']}, {args.dtype}, config {args.config}, "
        f"init {args.init}, median of {args.repeats} after {args.warmup} warm-up; floor at {args.floor_tflops} TFLOP/s")
    print_table(["case", "model", "tokens", "time s", "floor s", "x floor", "TFLOP/s", "peak GiB", "fwd GiB",
                 "syncs"], rows)
    log(f"\nParity hf vs packing ({args.dtype}, features as float32, statistics in float64)")
    print_table(["case", "tokens", "min cos", "mean cos", "max abs", "mean abs"], prow)
    if SYNC_MESSAGES:
        log("\nsynchronising calls seen by torch.cuda.set_sync_debug_mode during forwards:")
        for message, count in SYNC_MESSAGES.items():
            log(f"  {count} x {message}")
    results["sync_messages"] = dict(SYNC_MESSAGES)


CROSS_PAIRS = (("cudnn", "varlen", "auto"), ("flash", "sdpa", "cudnn"))


def run_cross_parity(args, device, dtype, hf, packing, results: dict) -> None:
    """Parity between the two models when their attention runs on different kernels (as the release pair does)."""
    config = hf.config
    rows = []
    pairs = CROSS_PAIRS if device.type == "cuda" else (("math", "sdpa", "default"),)
    for index, case in enumerate(args.cases):
        sample = make_sample(case, config, dtype, device, seed=100 + index)
        for hf_kernel, backend, kernel in pairs:
            label = f"hf:{hf_kernel} vs packing:{backend}" + (f":{kernel}" if backend == "sdpa" else "")
            try:
                hf.attention_kernel = hf_kernel
                packing.packed_attention_backend, packing.attention_kernel = backend, kernel
                p = parity_stats(extract_hf(hf, sample, temporal_context=config.rope_temporal_size),
                                 extract_packing(packing, [sample])[0])
                rows.append([case, str(sample.num_tokens), label, f"{p['min_cos']:.6f}", f"{p['mean_cos']:.6f}",
                             f"{p['max_abs']:.4g}"])
                results.setdefault("cross_parity", []).append({"case": case, "pair": label, **p})
            except Exception as err:
                rows.append([case, str(sample.num_tokens), label, "error", "-", "-"])
                log(f"  {case} {label}: {type(err).__name__}: {err}"[:300])
            finally:
                hf.attention_kernel, packing.packed_attention_backend, packing.attention_kernel = "auto", "auto", "auto"
        del sample
    log(f"\nParity across attention kernels ({args.dtype}): the models on different kernels")
    print_table(["case", "tokens", "pair", "min cos", "mean cos", "max abs"], rows)


def run_rope_check(args, device, dtype, config, results: dict) -> None:
    """The RoPE path used on this device against the plain float32 formula; first-call (compile) time."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    rotary = model_layers.VisionRotary3D(head_dim, config.rope_theta)
    gen = torch.Generator(device=device).manual_seed(3)
    checks = {}
    t0 = time.perf_counter()
    for layout in ("packing (N, H, D) view of qkv", "hf (1, H, N, D) view"):
        for n in (1, 37, 4099):
            positions = torch.randint(0, 64, (n, 3), generator=gen, device=device)
            cos, sin = rotary(positions)
            if layout.startswith("packing"):
                x = torch.randn(n, 3, heads, head_dim, generator=gen, device=device).to(dtype)[:, 0]
                c, s_ = cos[:, None], sin[:, None]
            else:
                x = torch.randn(1, n, heads, head_dim, generator=gen, device=device).to(dtype).transpose(1, 2)
                c, s_ = cos[None, None], sin[None, None]
            fast = model_layers.apply_rope(x, c, s_)
            ref = model_layers.apply_rope_reference(x, c, s_)
            if n == 1 and layout.startswith("packing"):
                sync(device)
                checks["first call incl. compile / cache load, s"] = time.perf_counter() - t0
            diff = (fast.float() - ref.float()).abs()
            checks[f"{layout}, n={n}: max abs diff"] = diff.max().item()
            checks[f"{layout}, n={n}: elements differing"] = int((diff > 0).sum().item())
            checks[f"{layout}, n={n}: same shape and strides"] = fast.shape == ref.shape and (
                fast.stride() == ref.stride() or fast.shape[0] == 1)
    module = model_layers._triton_state.get("module")
    checks["path"] = "triton" if (device.type == "cuda" and module is not None and model_layers.ROPE_IMPL != "torch") \
        else "torch"
    checks["triton error"] = str(model_layers._triton_state.get("error"))
    results["rope_check"] = checks
    log("\nRoPE check (" + args.dtype + ", path " + checks["path"] + "):")
    for k, v in checks.items():
        log(f"  {k}: {v}")


def run_variants(args, device, dtype, hf, packing, results: dict) -> None:
    """Whole forwards with other attention kernels / backends than the defaults."""
    config = hf.config
    rows = []
    for index, case in enumerate(args.variant_cases):
        sample = make_sample(case, config, dtype, device, seed=200 + index)
        flops = model_flops(config, [sample.num_tokens])
        for variant in args.variants:
            side, _, choice = variant.partition(":")
            try:
                if side == "rope":
                    model_layers.ROPE_IMPL = choice
                    both = lambda: (extract_hf(hf, sample, temporal_context=config.rope_temporal_size),  # noqa: E731
                                    extract_packing(packing, [sample])[0])
                    fn = both
                elif side == "hf":
                    hf.attention_kernel = choice
                    fn = lambda: extract_hf(hf, sample, temporal_context=config.rope_temporal_size)  # noqa: E731
                else:
                    backend, _, kernel = choice.partition(":")
                    packing.packed_attention_backend = backend
                    packing.attention_kernel = kernel or "auto"
                    fn = lambda: extract_packing(packing, [sample])[0]  # noqa: E731
                median, _, _ = time_region(fn, device, 1, max(2, args.repeats // 2))
                work = flops * (2 if side == "rope" else 1)
                entry = {"case": case, "variant": variant, "median_s": median, "tflops": work / median / 1e12,
                         "x_floor": median / (work / (args.floor_tflops * 1e12))}
                rows.append([case, variant, f"{median:.4f}", f"{entry['tflops']:.1f}", f"{entry['x_floor']:.2f}"])
            except Exception as err:  # a kernel that is absent or refuses these inputs is reported, not fatal
                entry = {"case": case, "variant": variant, "error": f"{type(err).__name__}: {err}"[:300]}
                rows.append([case, variant, "error", "-", "-"])
                log(f"  {case} {variant}: {entry['error']}")
            finally:
                hf.attention_kernel = "auto"
                packing.packed_attention_backend = "auto"
                packing.attention_kernel = "auto"
                model_layers.ROPE_IMPL = "auto"
            results["variants"].append(entry)
        sample = None
    log("\nWhole forwards per variant (hf:<sdpa kernel>, packing:<backend>[:<sdpa kernel>]; rope:<impl> = both models "
        "one after the other, FLOPs of both)")
    print_table(["case", "variant", "time s", "TFLOP/s", "x floor"], rows)


def attention_inputs(lengths: list[int], heads: int, head_dim: int, device, dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    n = sum(lengths)
    qkv = torch.randn(n, 3, heads, head_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    q, k, v = qkv.unbind(1)
    return q.contiguous(), k.contiguous(), v  # v strided like the packing model's


def run_attention(args, device, dtype, config, results: dict) -> None:
    """The attention kernels alone: dense SDPA kernels on (1, H, N, d) and the packed backends."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    scale = head_dim**-0.5
    rows = []
    setups = [(case, [make_tokens(case, config)]) for case in args.cases]
    if args.packed_setup:
        setups.append(("packed-" + "+".join(args.packed_setup), [make_tokens(c, config) for c in args.packed_setup]))
    # correctness first, on small problems against float64 math: packed on three segments, dense on one
    small = [300, 1000, 77] if device.type == "cuda" else [30, 50]
    for lengths, prefix in ((small, "packed"), ([sum(small)], "dense")):
        q, k, v = attention_inputs(lengths, heads, head_dim, device, dtype, seed=7)
        seg = pa.PackedSegments.from_lengths(lengths, device)
        ref, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            ref.append(F.scaled_dot_product_attention(*(x[sl].double().transpose(0, 1) for x in (q, k, v)),
                                                      scale=scale).transpose(0, 1))
            start += n
        ref = torch.cat(ref)
        for name, fn in attention_variants(q, k, v, seg, scale, device):
            if not name.startswith(prefix):
                continue
            try:
                out = fn()
                out = out[0].transpose(0, 1) if name.startswith("dense") else out
                err = ((out.double() - ref).norm() / ref.norm()).item()
                results["attention_check"][name] = err
            except Exception as exc:
                results["attention_check"][name] = f"{type(exc).__name__}: {exc}"[:200]
    log("\nAttention correctness (rel. L2 error vs float64; packed: segments " + str(small) + ", dense: one of "
        + str(sum(small)) + "): " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} ERROR {v}"
                                               for k, v in results["attention_check"].items()))
    for label, lengths in setups:
        q, k, v = attention_inputs(lengths, heads, head_dim, device, dtype, seed=11)
        seg = pa.PackedSegments.from_lengths(lengths, device)
        flops = sum(4.0 * n * n * config.hidden_size for n in lengths)
        for name, fn in attention_variants(q, k, v, seg, scale, device):
            if name.startswith("dense") and len(lengths) > 1:
                continue
            try:
                median, _, _ = time_region(fn, device, 2, args.repeats)
                entry = {"setup": label, "tokens": sum(lengths), "kernel": name, "median_s": median,
                         "tflops": flops / median / 1e12}
                rows.append([label, str(sum(lengths)), name, f"{median * 1e3:.2f}", f"{entry['tflops']:.1f}"])
            except Exception as exc:
                entry = {"setup": label, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
                rows.append([label, str(sum(lengths)), name, "error", "-"])
            results["attention"].append(entry)
        del q, k, v
    log(f"\nAttention alone per layer call ({heads} heads x {head_dim}, {args.dtype})")
    print_table(["setup", "tokens", "kernel", "ms", "TFLOP/s"], rows)


def make_tokens(case: str, config) -> int:
    _, t, height, width = CASES[case]
    return t * (height // config.patch_size) * (width // config.patch_size)


def attention_variants(q, k, v, seg, scale, device):
    """(name, fn) of every attention path available on this device for packed q, k, v (N, H, d)."""
    variants = []
    dense_q, dense_k, dense_v = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    kernels = ["default", "flash", "cudnn", "efficient"] if device.type == "cuda" else ["default"]
    for kernel in kernels:
        variants.append((f"dense-sdpa-{kernel}",
                         lambda kernel=kernel: pa.sdpa_attention(dense_q, dense_k, dense_v, scale, kernel)))
    for kernel in kernels:
        variants.append((f"packed-sdpa-{kernel}",
                         lambda kernel=kernel: pa.packed_attention(q, k, v, seg, scale, "sdpa", kernel)))
    if device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        if pa._has_varlen():
            variants.append(("packed-varlen", lambda: pa.packed_attention(q, k, v, seg, scale, "varlen")))
        variants.append(("packed-nested-default", lambda: pa.packed_attention(q, k, v, seg, scale, "nested", "default")))
        variants.append(("packed-nested-cudnn", lambda: pa.packed_attention(q, k, v, seg, scale, "nested", "cudnn")))
        if pa._has_flash_attn():
            variants.append(("packed-flash_attn", lambda: pa.packed_attention(q, k, v, seg, scale, "flash_attn")))
    return variants


def write_media(folder: Path, specs: list[tuple[str, int, int, int]], seed: int = 0) -> list[Path]:
    """Write (name, frames, height, width) files with OpenCV: .jpg images, .mp4 (mp4v) videos."""
    import cv2

    paths = []
    for index, (name, t, height, width) in enumerate(specs):
        path = folder / name
        frames = synthetic_frames(t, height, width, seed + index)
        if path.suffix == ".jpg":
            if not cv2.imwrite(str(path), cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]):
                raise RuntimeError(f"cannot write {path}")
        else:
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24.0, (width, height))
            if not writer.isOpened():
                raise RuntimeError(f"cannot open a video writer for {path}")
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            writer.release()
        paths.append(path)
    return paths


def run_overhead(args, device, dtype, hf, packing, workdir: Path, results: dict) -> None:
    """The suite's work around the forwards for one video file, each step timed on its own."""
    from vitparity.compare import compare_features
    from vitparity.media import load_media
    from vitparity.snapshots import file_sha256, reduce_features

    config = hf.config
    t, height, width = args.media_video
    (path,) = write_media(workdir, [("overhead.mp4", args.media_video_frames, height, width)], seed=50)
    steps: dict[str, float] = {}

    def timed(name: str, fn, repeats: int = 3):
        values, out = [], None
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            values.append(time.perf_counter() - t0)
        steps[name] = statistics.median(values)
        return out

    media = timed("decode (load_media, 8 frames)", lambda: load_media(path, num_frames=t, patch_size=config.patch_size))
    timed("sha256 of the file", lambda: file_sha256(path))
    sample = timed("normalise + host-to-device (prepare_sample)", lambda: prepare_sample(
        media, patch_size=config.patch_size, dtype=dtype, device=device, temporal_context=config.rope_temporal_size))
    timed("patchify + positions (packing side)", lambda: (patchify(sample.pixels, config.patch_size),
                                                          token_positions(sample)))
    # the non-packing protocol's own work = extract_hf minus its model forward (hooks time the forward)
    for side, model, fn in (
        ("hf", hf, lambda: extract_hf(hf, sample, temporal_context=config.rope_temporal_size)),
        ("packing", packing, lambda: extract_packing(packing, [sample])[0]),
    ):
        fn()
        clock = ForwardClock(model, device)
        sync(device)
        t0 = time.perf_counter()
        feats = fn()
        sync(device)
        total = time.perf_counter() - t0
        steps[f"{side}: extraction outside the model forward"] = total - clock.total()
        clock.remove()
        if side == "hf":
            a = feats
        else:
            b = feats
        del feats
    # as the suite does: features stay on the device; comparison and golden reduction copy per-token results only
    timed("compare_features (torch tensors, on the device)", lambda: compare_features(a, b, name="overhead"))
    timed("golden reduction of both sides (on the device)", lambda: (reduce_features(a), reduce_features(b)))
    a = b = None
    # alternatives the suite does not use (for reference): comparison on the device, copy into pinned memory
    ga = extract_hf(hf, sample, temporal_context=config.rope_temporal_size)
    gb = extract_packing(packing, [sample])[0]
    alternatives: dict[str, float] = {}
    for name, fn in (
        ("per-token cosine + stats on the device (torch, float64)", lambda: parity_stats(ga, gb)),
        ("per-token cosine + stats on the device (torch, float32)", lambda: (
            F.cosine_similarity(ga, gb, dim=-1).min().item(), (ga - gb).abs().max().item())),
        ("one feature array to pinned host memory", lambda: ga.to("cpu", non_blocking=True) if device.type != "cuda"
         else torch.empty(ga.shape, dtype=ga.dtype, pin_memory=True).copy_(ga, non_blocking=True)),
    ):
        values = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            values.append(time.perf_counter() - t0)
        alternatives[name] = statistics.median(values)
    ga = gb = None
    results["overhead"] = {"tokens": sample.num_tokens, "file": str(path.name), "steps_s": steps,
                           "total_s": sum(steps.values()), "alternatives_s": alternatives}
    log(f"\nSuite overhead for one {width}x{height} {t}-frame video ({sample.num_tokens} tokens), "
        f"median of 3 (comparison: 1 run)")
    print_table(["step", "seconds"], [[k, f"{v:.4f}"] for k, v in steps.items()] +
                [["total", f"{sum(steps.values()):.4f}"]])
    log("  not used by the suite, for reference:")
    for k, v in alternatives.items():
        log(f"    {k}: {v:.4f} s")


def parity_run_child(args) -> dict:
    """The timed body of a whole parity run (runs in a fresh process: cold CUDA, cold kernels)."""
    from vitparity.compare import compare_features
    from vitparity.loading import load_model
    from vitparity.media import load_media
    from vitparity.snapshots import file_sha256, reduce_features

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    workdir = Path(args.parity_run_child)
    media = sorted(p for p in (workdir / "media").iterdir())
    t_start = time.perf_counter()
    imports = t_start - _T_SCRIPT
    if device.type == "cuda":
        torch.cuda.init()
    parts = {"cuda init": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    hf = load_model(workdir / "hf", dtype=dtype, device=device).model
    packing = load_model(workdir / "packing", dtype=dtype, device=device).model
    sync(device)
    parts["model load (2 checkpoints)"] = time.perf_counter() - t0
    clocks = {"hf": ForwardClock(hf, device), "packing": ForwardClock(packing, device)}
    per_case, steps = [], {"decode": 0.0, "sha256": 0.0, "prepare": 0.0, "extract": 0.0, "compare": 0.0,
                           "golden reduction": 0.0}

    def step(name, fn):
        t = time.perf_counter()
        out = fn()
        sync(device)
        steps[name] += time.perf_counter() - t
        return out

    for path in media:
        m = step("decode", lambda: load_media(path, num_frames=8, patch_size=hf.config.patch_size))
        step("sha256", lambda: file_sha256(path))
        sample = step("prepare", lambda: prepare_sample(
            m, patch_size=hf.config.patch_size, dtype=dtype, device=device,
            temporal_context=hf.config.rope_temporal_size, name=path.name))
        fa = step("extract", lambda: extract_hf(hf, sample, temporal_context=hf.config.rope_temporal_size))
        fb = step("extract", lambda: extract_packing(packing, [sample])[0])
        comparison = step("compare", lambda: compare_features(fa, fb, name=path.name))
        step("golden reduction", lambda: (reduce_features(fa), reduce_features(fb)))
        per_case.append({"file": path.name, "tokens": sample.num_tokens, "min_cos": comparison.min_cos,
                         "mean_cos": comparison.mean_cos, "max_abs": comparison.max_abs})
        sample = fa = fb = None
    forward = {side: clock.total() for side, clock in clocks.items()}
    total = time.perf_counter() - t_start
    parts.update(steps)
    parts["extract"] -= sum(forward.values())
    parts["extract"] = max(parts["extract"], 0.0)
    parts = {("protocol outside forwards" if k == "extract" else k): v for k, v in parts.items()}
    # the suite's packed-batch test: every case in one packing forward (timed apart from the run above)
    samples = [prepare_sample(load_media(p, num_frames=8, patch_size=hf.config.patch_size),
                              patch_size=hf.config.patch_size, dtype=dtype, device=device,
                              temporal_context=hf.config.rope_temporal_size) for p in media]
    sync(device)
    t0 = time.perf_counter()
    packed = extract_packing(packing, samples)
    sync(device)
    packed_s = time.perf_counter() - t0
    del packed
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"total_s": total, "imports_s": imports, "parts_s": parts, "forward_s": forward, "cases": per_case,
            "packed_batch_forward_s": packed_s, "peak_gib": peak}


def run_parity(args, device, dtype, hf, packing, workdir: Path, results: dict) -> None:
    """Save both models as checkpoints, write the media, then time a whole parity run in a fresh process."""
    (workdir / "media").mkdir(exist_ok=True)
    specs = [(name, *args.parity_media[kind]) for name, kind in
             (("a_image1.jpg", "image"), ("b_image2.jpg", "image"), ("c_video1.mp4", "video"), ("d_video2.mp4", "video"))]
    t0 = time.perf_counter()
    write_media(workdir / "media", specs, seed=300)
    hf.save_pretrained(workdir / "hf")
    packing.save_pretrained(workdir / "packing")
    log(f"\n(parity run set-up: checkpoints ({args.dtype}) and media written in {time.perf_counter() - t0:.1f} s)")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--parity-run-child", str(workdir),
           "--device", args.device, "--dtype", args.dtype]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.parity_timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"parity run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    child["process_wall_s"] = wall
    child["media"] = [list(s) for s in specs]
    results["parity_run"] = child
    overhead = sum(v for k, v in child["parts_s"].items() if k in
                   ("decode", "sha256", "prepare", "protocol outside forwards", "compare", "golden reduction"))
    child["suite_overhead_s"] = overhead
    child["suite_overhead_fraction"] = overhead / child["total_s"]
    log(f"\nWhole parity run: {len(specs)} files ({', '.join(s[0] for s in specs)}), both models, "
        f"fresh process, {args.dtype} on {results['machine']['device']}")
    rows = [[k, f"{v:.3f}"] for k, v in child["parts_s"].items()]
    rows += [[f"forward {k} (sum)", f"{v:.3f}"] for k, v in child["forward_s"].items()]
    rows += [["total, in process (after imports)", f"{child['total_s']:.3f}"],
             ["imports (python, torch, transformers, vitparity) before the run", f"{child['imports_s']:.3f}"],
             ["process wall (python start to exit)", f"{wall:.3f}"],
             ["suite overhead (decode, hash, prepare, protocol, compare, golden reduction)",
              f"{overhead:.3f} ({100 * child['suite_overhead_fraction']:.1f}%)"],
             ["extra: packed batch of all files, one packing forward", f"{child['packed_batch_forward_s']:.3f}"]]
    print_table(["part", "seconds"], rows)
    for case in child["cases"]:
        log(f"  {case['file']}: {case['tokens']} tokens, min cos {case['min_cos']:.6f}, "
            f"mean {case['mean_cos']:.6f}, max abs {case['max_abs']:.4g}")


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--config", default="vit-l", choices=[c for c in CONFIGS if c != "small"])
    parser.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="tiny config and inputs (a CPU smoke test)")
    parser.add_argument("--init", default="hf", choices=["hf", "sharp"],
                        help="hf: the models' initializer (normal, std 0.02); sharp: fan-in scale, q/k x2.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor-tflops", type=float, default=795.0)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["rope-check", "forward", "cross-parity", "variants", "attention", "overhead",
                                 "parity-run", "sharp-parity"])
    parser.add_argument("--variants", nargs="*", default=None,
                        help="whole-forward variants, e.g. hf:flash hf:cudnn packing:varlen packing:sdpa:flash")
    parser.add_argument("--variant-cases", nargs="*", default=None, choices=sorted(CASES))
    parser.add_argument("--packed-setup", nargs="*", default=None, choices=sorted(CASES),
                        help="cases packed together for the attention section")
    parser.add_argument("--profile", action="store_true", help="profile one forward per model on the first case")
    parser.add_argument("--profile-rows", type=int, default=18)
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    parser.add_argument("--workdir", type=Path, default=None, help="for checkpoints and media (default: a temp dir)")
    parser.add_argument("--parity-timeout", type=float, default=900)
    parser.add_argument("--parity-run-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.small:
        args.config = "small"
        args.cases = args.cases or SMALL_CASES
        args.media_video, args.media_video_frames = (8, 42, 56), 12
        args.parity_media = {"image": (1, 56, 70), "video": (12, 42, 56)}
        args.variant_cases = args.variant_cases or ["video-small"]
        args.packed_setup = args.packed_setup if args.packed_setup is not None else SMALL_CASES
    else:
        args.cases = args.cases or REAL_CASES
        args.media_video, args.media_video_frames = (8, 1080, 1920), 48
        args.parity_media = {"image": (1, 1080, 1920), "video": (48, 1080, 1920)}
        args.variant_cases = args.variant_cases or ["image-1080p", "video-480p"]
        args.packed_setup = args.packed_setup if args.packed_setup is not None else [
            "image-1080p", "image-1080p", "video-1080p", "video-1080p"]
    if args.variants is None:
        args.variants = (["hf:default", "hf:flash", "hf:cudnn", "hf:efficient", "packing:sdpa:flash",
                          "packing:sdpa:cudnn", "packing:varlen", "packing:nested:default", "rope:torch", "rope:auto"]
                         if args.device.startswith("cuda") else ["hf:default", "packing:sdpa:default", "rope:torch"])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.parity_run_child:
        print(json.dumps(parity_run_child(args)))
        return 0
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA requested but not available; use --device cpu (and --small)")
        return 2
    results = {"machine": machine_info(device), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(args).items()},
               "forward": [], "variants": [], "attention": [], "attention_check": {}}
    m = results["machine"]
    log(f"device {m['device']}  torch {m['torch']}  transformers {m['transformers']}  python {m['python']}  "
        f"cuda {m.get('cuda')}  cudnn {m.get('cudnn')}  varlen_attn {m['varlen_attn']}  flash_attn {m['flash_attn']}  "
        f"date {m['date_utc']} UTC")
    t0 = time.perf_counter()
    hf, packing = build_models(args.config, device, dtype, args.seed, args.init)
    sync(device)
    c = hf.config
    log(f"config {args.config}: hidden {c.hidden_size}, layers {c.num_hidden_layers}, heads {c.num_attention_heads} "
        f"(head_dim {c.head_dim}), intermediate {c.intermediate_size}, patch {c.patch_size}; "
        f"{sum(p.numel() for p in hf.parameters()) / 1e6:.1f} M parameters; dtype {args.dtype}; device {device}; "
        f"built in {time.perf_counter() - t0:.1f} s")
    probe = torch.empty(0, device=device, dtype=dtype)
    log(f"auto choices here: dense SDPA kernel {pa.resolve_sdpa_kernel('auto', probe)!r}, packed backend "
        f"{pa.resolve_backend('auto', probe)!r}, packed SDPA kernel {pa.resolve_sdpa_kernel('auto', probe)!r}, "
        f"RoPE {model_layers.ROPE_IMPL!r} (Triton on CUDA when available)")
    with tempfile.TemporaryDirectory(prefix="vitparity-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode():
            if "rope-check" not in args.skip:
                run_rope_check(args, device, dtype, c, results)
            if "forward" not in args.skip:
                run_forward(args, device, dtype, hf, packing, results)
            if "cross-parity" not in args.skip:
                run_cross_parity(args, device, dtype, hf, packing, results)
            if "attention" not in args.skip:
                run_attention(args, device, dtype, c, results)
            if "variants" not in args.skip and args.variants:
                run_variants(args, device, dtype, hf, packing, results)
            if args.profile:
                run_profile(args, device, dtype, hf, packing, results)
            if "overhead" not in args.skip:
                run_overhead(args, device, dtype, hf, packing, workdir, results)
        if "parity-run" not in args.skip:
            run_parity(args, device, dtype, hf, packing, workdir, results)
        if "sharp-parity" not in args.skip:
            run_sharp_parity(args, device, dtype, results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        log(f"\nwrote {args.json}")
    return 0


def run_profile(args, device, dtype, hf, packing, results: dict) -> None:
    """torch.profiler over one forward of each model on the first case: where the GPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    config = hf.config
    sample = make_sample(args.cases[0], config, dtype, device, seed=500)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for side, fn in (("hf", lambda: extract_hf(hf, sample, temporal_context=config.rope_temporal_size)),
                     ("packing", lambda: extract_packing(packing, [sample])[0])):
        fn()
        sync(device)
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60)
        results.setdefault("profile", {})[side] = table
        log(f"\nProfile of one {side} forward on {args.cases[0]} ({sample.num_tokens} tokens)\n{table}")


def run_sharp_parity(args, device, dtype, results: dict) -> None:
    """bf16 parity with sharp attention weights (fan-in scale, q/k x2.5) on the first two cases."""
    hf, packing = build_models(args.config, device, dtype, args.seed + 1, "sharp")
    rows = []
    with torch.inference_mode():
        for index, case in enumerate(args.cases[:2]):
            sample = make_sample(case, hf.config, dtype, device, seed=400 + index)
            a = extract_hf(hf, sample, temporal_context=hf.config.rope_temporal_size)
            b = extract_packing(packing, [sample])[0]
            p = parity_stats(a, b)
            results.setdefault("sharp_parity", []).append({"case": case, "tokens": sample.num_tokens, **p})
            rows.append([case, str(sample.num_tokens), f"{p['min_cos']:.6f}", f"{p['mean_cos']:.6f}",
                         f"{p['max_abs']:.4g}"])
            del a, b, sample
    log(f"\nParity with sharp weights (init 'sharp'), {args.dtype}")
    print_table(["case", "tokens", "min cos", "mean cos", "max abs"], rows)


if __name__ == "__main__":
    sys.exit(main())
