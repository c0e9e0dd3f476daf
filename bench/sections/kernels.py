"""Attention kernels alone (dense and packed, each checked against float64 first), the RoPE path against its
formula, and whole forwards per kernel choice. Every kernel that can run here is named by `bench.kernels`
(`attention.available_backends` / `available_sdpa_kernels`), which also runs the models on them (`variant`)."""

from __future__ import annotations

import time

import torch

from vitparity.models import layers
from vitparity.models.packed_attention import PackedSegments

from ..kernels import attention as pa
from ..kernels.rope import apply_rope_triton, rope_status, rope_variant
from ..common import Progress, Timer, attention_flops, floor_seconds, log, model_flops, print_table, sync
from ..workloads import case_tokens, forward_fns, make_sample

# only for the float64 check: they materialise n x n scores (no timing at real size)
CHECK_ONLY = ("eager",)


def attention_variants(q, k, v, segments: PackedSegments, scale: float) -> list[tuple[str, object]]:
    """(name, fn) of every attention path available here for packed q, k, v (N, H, d); dense ones see one sample."""
    device, dtype = q.device, q.dtype
    dense = tuple(x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    variants = []
    for kernel in pa.available_sdpa_kernels(device, dtype):
        variants.append((f"dense-sdpa-{kernel}", lambda kernel=kernel: pa.sdpa_attention(*dense, scale, kernel)))
    variants.append(("dense-flex", lambda: pa.dense_attention(*dense, scale, "flex_attention")))
    for backend in pa.available_backends(device, dtype):
        if backend in ("sdpa", "nested"):
            for kernel in pa.available_sdpa_kernels(device, dtype):
                variants.append((f"packed-{backend}-{kernel}",
                                 lambda b=backend, kernel=kernel: pa.packed_attention(q, k, v, segments, scale, b, kernel)))
        else:
            variants.append((f"packed-{backend}", lambda b=backend: pa.packed_attention(q, k, v, segments, scale, b)))
    return variants


def attention_inputs(lengths: list[int], heads: int, head_dim: int, device, dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, generator=gen, device=device).to(dtype)
    q, k, v = qkv.unbind(1)
    return q.contiguous(), k.contiguous(), v  # v strided like the packing model's


def _reference(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    out, start = [], 0
    for n in lengths:
        part = [x[start:start + n].double().transpose(0, 1) for x in (q, k, v)]
        out.append(torch.softmax(part[0] @ part[1].transpose(1, 2) * scale, dim=-1) @ part[2])
        start += n
    return torch.cat([o.transpose(0, 1) for o in out])


def run_attention(opts, config, results: dict) -> None:
    """Each kernel against float64 attention on a small problem, then timed at each case's size."""
    device, dtype, heads, head_dim = opts.device, opts.dtype, config.num_attention_heads, config.head_dim
    scale = head_dim**-0.5
    small = [300, 1000, 77] if device.type == "cuda" else [30, 50, 7]
    q, k, v = attention_inputs(small, heads, head_dim, device, dtype, seed=7)
    for lengths, prefix in ((small, "packed"), ([sum(small)], "dense")):
        ref = _reference(q, k, v, lengths, scale)
        segments = PackedSegments.from_lengths(lengths, device)
        for name, fn in attention_variants(q, k, v, segments, scale):
            if not name.startswith(prefix):
                continue
            try:
                out = fn()
                out = out[0].transpose(0, 1) if prefix == "dense" else out
                results["attention_check"][name] = ((out.double() - ref).norm() / ref.norm()).item()
            except Exception as err:  # a kernel that refuses here is reported, not fatal
                results["attention_check"][name] = f"{type(err).__name__}: {err}"[:200]
    log(f"\nAttention vs float64 (relative L2 error; packed: segments {small}, dense: one of {sum(small)}): "
        + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} ERROR {v}"
                    for k, v in results["attention_check"].items()))
    timer, rows = Timer(device), []
    setups = [(case, [case_tokens(case, config.patch_size)]) for case in opts.cases]
    if opts.packed_setup:
        setups.append(("packed-" + "+".join(opts.packed_setup),
                       [case_tokens(c, config.patch_size) for c in opts.packed_setup]))
    with Progress("attention", len(setups)) as progress:
        for label, lengths in setups:
            q, k, v = attention_inputs(lengths, heads, head_dim, device, dtype, seed=11)
            segments = PackedSegments.from_lengths(lengths, device)
            flops = attention_flops(config, lengths)
            progress.step(f"{label} ({sum(lengths)} tokens): each kernel, 2 warm-up + {opts.repeats} timed calls")
            for name, fn in attention_variants(q, k, v, segments, scale):
                if (name.startswith("dense") and len(lengths) > 1) or name.endswith(CHECK_ONLY):
                    continue
                if not isinstance(results["attention_check"].get(name), float):
                    continue  # failed or skipped the float64 check: not timed
                try:
                    median, _, _ = timer.measure(fn, 2, opts.repeats)
                    entry = {"setup": label, "tokens": sum(lengths), "kernel": name, "median_s": median,
                             "tflops": flops / median / 1e12}
                    rows.append([label, str(sum(lengths)), name, f"{median * 1e3:.2f}", f"{entry['tflops']:.1f}"])
                except Exception as err:
                    entry = {"setup": label, "kernel": name, "error": f"{type(err).__name__}: {err}"[:300]}
                    rows.append([label, str(sum(lengths)), name, "error", "-"])
                results["attention"].append(entry)
            del q, k, v
    print_table(f"Attention alone per layer call ({heads} heads x {head_dim}, {opts.dtype_name})",
                ["setup", "tokens", "kernel", "ms", "TFLOP/s"], rows)


def run_rope_check(opts, config, results: dict) -> None:
    """The Triton RoPE variant's path on this device (the product's torch RoPE where Triton cannot run) against
    the plain float32 formula; first-call (compile) time."""
    device, heads, head_dim = opts.device, config.num_attention_heads, config.head_dim
    rotary = layers.VisionRotary3D(head_dim, config.rope_theta)
    gen = torch.Generator(device=device).manual_seed(3)
    checks: dict[str, object] = dict(rope_status(device))
    t0 = time.perf_counter()
    for layout in ("packing", "hf"):
        for n in (1, 37, 4099):
            cos, sin = rotary(torch.randint(0, 64, (n, 3), generator=gen, device=device))
            if layout == "packing":  # (N, H, D) view of the fused qkv output
                x = torch.randn(n, 3, heads, head_dim, generator=gen, device=device).to(opts.dtype)[:, 0]
                c, s = cos[:, None], sin[:, None]
            else:  # (1, H, N, D) view
                x = torch.randn(1, n, heads, head_dim, generator=gen, device=device).to(opts.dtype).transpose(1, 2)
                c, s = cos[None, None], sin[None, None]
            diff = (apply_rope_triton(x, c, s).float() - layers.apply_rope_reference(x, c, s).float()).abs()
            if "first call s" not in checks:
                sync(device)
                checks["first call s"] = time.perf_counter() - t0
            checks[f"{layout} n={n}: max abs diff"] = diff.max().item()
            checks[f"{layout} n={n}: elements differing"] = int((diff > 0).sum().item())
    results["rope_check"] = checks
    log(f"\nRoPE check ({opts.dtype_name}): " + ", ".join(f"{k} {v}" for k, v in checks.items()))


def _variant_call(variant: str, fns: dict):
    """The call of `variant`, the context it runs in (`bench.kernels`), and how many forwards it makes."""
    side, _, choice = variant.partition(":")
    if side == "rope":
        return (lambda: (fns["hf"](), fns["packing"]())), rope_variant(choice), 2
    if side == "hf":
        return fns["hf"], pa.attention_variant(hf=choice), 1
    backend, _, kernel = choice.partition(":")
    return fns["packing"], pa.attention_variant(packing=(backend, kernel or "default")), 1


def run_variants(opts, hf, packing, results: dict) -> None:
    """Whole forwards with other kernels than the product's: hf:<sdpa kernel | attn_implementation>,
    packing:<backend>[:<sdpa kernel>], rope:<torch | triton> (both models one after the other)."""
    timer, rows = Timer(opts.device), []
    with Progress("variants", len(opts.variant_cases) * len(opts.variants)) as progress:
        for index, case in enumerate(opts.variant_cases):
            sample = make_sample(case, hf.config, opts.dtype, opts.device, seed=200 + index)
            fns = forward_fns(hf, packing, sample)
            flops = model_flops(hf.config, [sample.num_tokens])
            for variant in opts.variants:
                progress.step(f"{case} ({sample.num_tokens} tokens), {variant}")
                try:
                    fn, context, forwards = _variant_call(variant, fns)
                    with context:
                        median, _, _ = timer.measure(fn, 1, max(2, opts.repeats // 2))
                    work = flops * forwards
                    floor = floor_seconds(opts.floor_tflops, work)
                    entry = {"case": case, "variant": variant, "median_s": median, "tflops": work / median / 1e12,
                             "x_floor": None if floor is None else median / floor}
                    rows.append([case, variant, f"{median:.4f}", f"{entry['tflops']:.1f}",
                                 *([] if floor is None else [f"{entry['x_floor']:.2f}"])])
                except Exception as err:  # a kernel absent here is reported, not fatal
                    entry = {"case": case, "variant": variant, "error": f"{type(err).__name__}: {err}"[:300]}
                    rows.append([case, variant, "error", "-", *([] if opts.floor_tflops is None else ["-"])])
                    log(f"  {case} {variant}: {entry['error']}")
                results["variants"].append(entry)
            del sample, fns
    print_table("Whole forwards per variant (rope:<impl> = both models, FLOPs of both)",
                ["case", "variant", "time s", "TFLOP/s", *([] if opts.floor_tflops is None else ["x floor"])], rows)
