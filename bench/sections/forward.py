"""Whole forwards per case: time against the FLOP floor (on a known GPU, or with --floor-tflops), peak memory, host
syncs, and parity of the two models (on the same kernels, on different kernels, and with sharp attention weights)."""

from __future__ import annotations

import torch

from ..common import (Progress, Timer, count_syncs, floor_seconds, fmt, log, model_flops, parity, peak_memory,
                      print_table)
from ..kernels.attention import attention_variant
from ..workloads import build_models, forward_fns, make_sample

# (hf SDPA kernel, packing backend, packing SDPA kernel): the two models on different kernels
CROSS_PAIRS_CUDA = (("cudnn", "varlen", "default"), ("flash", "sdpa", "cudnn"), ("cudnn", "flex", "default"))
CROSS_PAIRS_CPU = (("math", "sdpa", "default"), ("default", "flex", "default"))


def run_forward(opts, hf, packing, results: dict) -> None:
    """Median forward time of each model per case, x its FLOP floor (when there is one), peak memory, host syncs,
    parity."""
    device, config, timer = opts.device, hf.config, Timer(opts.device)
    rows, prows, syncs = [], [], {}
    with Progress("forward", 2 * len(opts.cases)) as progress:
        for index, case in enumerate(opts.cases):
            sample = make_sample(case, config, opts.dtype, device, seed=100 + index)
            flops = model_flops(config, [sample.num_tokens])
            floor = floor_seconds(opts.floor_tflops, flops)
            entry = {"case": case, "tokens": sample.num_tokens, "flops": flops, "floor_s": floor}
            outputs = {}
            for side, fn in forward_fns(hf, packing, sample).items():
                progress.step(f"{case} ({sample.num_tokens} tokens), {side} model: {opts.warmup} warm-up + "
                              f"{opts.repeats} timed forwards")
                mem: dict = {}
                with peak_memory(device, mem):
                    median, times, outputs[side] = timer.measure(fn, opts.warmup, opts.repeats)
                entry[side] = {"median_s": median, "times_s": times, "tflops": flops / median / 1e12,
                               "x_floor": None if floor is None else median / floor, **mem,
                               "host_syncs": count_syncs(fn, device, syncs)}
                r = entry[side]
                rows.append([case, side, str(sample.num_tokens), f"{median:.4f}",
                             *([] if floor is None else [f"{floor:.4f}", f"{r['x_floor']:.2f}"]),
                             f"{r['tflops']:.1f}", fmt(r["peak_gib"], ".2f"), fmt(r["extra_gib"], ".2f"),
                             str(r["host_syncs"])])
            entry["parity"] = p = parity(outputs["hf"], outputs["packing"], case)
            prows.append([case, str(sample.num_tokens), f"{p['min_cos']:.6f}", f"{p['mean_cos']:.6f}",
                          f"{p['max_abs']:.4g}", f"{p['mean_abs']:.4g}"])
            results["forward"].append(entry)
            del outputs, sample
    results["sync_messages"] = syncs
    memory = "CUDA max allocated" if device.type == "cuda" else "process peak RSS"
    has_floor = opts.floor_tflops is not None
    print_table(f"Forward (extraction protocol), {results['machine']['device']}, {opts.dtype_name}, config "
                f"{opts.config}, median of {opts.repeats} after {opts.warmup} warm-up; "
                + (f"floor at {opts.floor_tflops} TFLOP/s; " if has_floor else "no FLOP floor here; ")
                + f"peak: {memory}",
                ["case", "model", "tokens", "time s", *(["floor s", "x floor"] if has_floor else []), "TFLOP/s",
                 "peak GiB", "fwd GiB", "syncs"], rows)
    print_table(f"Parity hf vs packing ({opts.dtype_name}, float32 comparison)",
                ["case", "tokens", "min cos", "mean cos", "max abs", "mean abs"], prows)
    for message, count in syncs.items():
        log(f"  sync seen {count} x: {message}")


def run_cross_parity(opts, hf, packing, results: dict) -> None:
    """Parity between the two models when their attention runs on different kernels (as the release pair does)."""
    pairs = CROSS_PAIRS_CUDA if opts.device.type == "cuda" else CROSS_PAIRS_CPU
    rows = []
    with Progress("cross-parity", len(opts.cases) * len(pairs)) as progress:
        for index, case in enumerate(opts.cases):
            sample = make_sample(case, hf.config, opts.dtype, opts.device, seed=100 + index)
            fns = forward_fns(hf, packing, sample)
            for hf_kernel, backend, kernel in pairs:
                label = f"hf:{hf_kernel} vs packing:{backend}" + (f":{kernel}" if backend == "sdpa" else "")
                progress.step(f"{case} ({sample.num_tokens} tokens), {label}")
                try:
                    with attention_variant(hf=hf_kernel, packing=(backend, kernel)):
                        p = parity(fns["hf"](), fns["packing"](), case)
                    rows.append([case, str(sample.num_tokens), label, f"{p['min_cos']:.6f}", f"{p['mean_cos']:.6f}",
                                 f"{p['max_abs']:.4g}"])
                    results["cross_parity"].append({"case": case, "pair": label, **p})
                except Exception as err:  # a kernel absent here is reported, not fatal
                    rows.append([case, str(sample.num_tokens), label, "error", "-", "-"])
                    results["cross_parity"].append({"case": case, "pair": label,
                                                    "error": f"{type(err).__name__}: {err}"})
            del sample, fns
    print_table(f"Parity across attention kernels ({opts.dtype_name}): the models on different kernels",
                ["case", "tokens", "pair", "min cos", "mean cos", "max abs"], rows)


def run_sharp_parity(opts, results: dict) -> None:
    """bf16 parity with sharp attention weights (fan-in scale, q/k x2.5) on the first two cases."""
    cases = opts.cases[:2]
    with Progress("sharp-parity", 1 + len(cases)) as progress:
        progress.step(f"building both models with sharp weights, config {opts.config}")
        hf, packing = build_models(opts.config, opts.device, opts.dtype, opts.seed + 1, "sharp")
        rows = []
        with torch.inference_mode():
            for index, case in enumerate(cases):
                sample = make_sample(case, hf.config, opts.dtype, opts.device, seed=400 + index)
                progress.step(f"{case} ({sample.num_tokens} tokens): one forward per model")
                fns = forward_fns(hf, packing, sample)
                p = parity(fns["hf"](), fns["packing"](), case)
                results["sharp_parity"].append({"case": case, "tokens": sample.num_tokens, **p})
                rows.append([case, str(sample.num_tokens), f"{p['min_cos']:.6f}", f"{p['mean_cos']:.6f}",
                             f"{p['max_abs']:.4g}"])
    print_table(f"Parity with sharp weights (init 'sharp'), {opts.dtype_name}",
                ["case", "tokens", "min cos", "mean cos", "max abs"], rows)
