"""What the early-exit forward saves: features from a forward that stops after the penultimate layer
(`output_layer=-2`, the project's models) against the whole forward keeping every hidden state
(`output_hidden_states=True`, what remote code runs), per case and model.

Two figures per mode:
- kept bytes: the hidden states the forward returns, counted from the returned tensors (exact);
- peak above the start: CUDA max allocated minus what was allocated before (exact); on the CPU the largest
  resident set seen by a thread sampling /proc/self/statm every millisecond, minus the resident set before,
  after glibc's malloc_trim has returned freed memory to the system. Memory the allocator still keeps from an
  earlier forward can serve a later one; the early exit runs first, so this understates the saving, if anything.
The early-exit features are also checked to be bit-identical to hidden_states[-2].
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vitparity.extract import FEATURE_LAYER, hf_inputs, model_dtype, packing_inputs

from ..common import Progress, log, print_table, sync
from ..workloads import make_sample

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024**2


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc malloc_trim), so that the resident set counts live memory."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


@contextmanager
def peak_above_start(device: torch.device, result: dict) -> Iterator[None]:
    """result["peak_bytes"]: the peak during the block above the memory in use at its start (see module doc)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        sync(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    _trim_heap()
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    result["peak_bytes"] = max(peak[0], _rss_bytes()) - base


def _inputs(model, sample, side: str) -> dict:
    if side == "hf":
        return hf_inputs(sample, model_dtype(model), temporal_context=model.config.rope_temporal_size)
    return packing_inputs([sample], model.config.patch_size, model_dtype(model))


@torch.inference_mode()
def _measure(model, inputs: dict, early: bool, device: torch.device) -> tuple[torch.Tensor, dict]:
    entry: dict = {}
    with peak_above_start(device, entry):
        if early:
            outputs = model(**inputs, output_layer=FEATURE_LAYER, return_dict=True)
            features, kept = outputs.last_hidden_state, [outputs.last_hidden_state]
        else:
            outputs = model(**inputs, output_hidden_states=True, return_dict=True)
            features, kept = outputs.hidden_states[FEATURE_LAYER], [*outputs.hidden_states, outputs.last_hidden_state]
        entry["kept_bytes"] = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t
                                                                         for t in kept}.values())
        sync(device)
    return features.clone(), entry


def run_early_exit(opts, hf, packing, results: dict) -> None:
    """Kept bytes and peak memory of the early-exit forward against the full forward, per case and model."""
    device, rows = opts.device, []
    results["early_exit"] = []
    with Progress("early-exit", 2 * len(opts.cases)) as progress:
        for index, case in enumerate(opts.cases):
            sample = make_sample(case, hf.config, opts.dtype, device, seed=100 + index)
            for side, model in (("hf", hf), ("packing", packing)):
                inputs = _inputs(model, sample, side)
                progress.step(f"{case} ({sample.num_tokens} tokens), {side} model: early exit, then all hidden states")
                early, early_mem = _measure(model, inputs, True, device)
                full, full_mem = _measure(model, inputs, False, device)
                entry = {"case": case, "model": side, "tokens": sample.num_tokens, "early": early_mem,
                         "full": full_mem, "bit_identical": bool(torch.equal(early, full))}
                results["early_exit"].append(entry)
                saved = full_mem["peak_bytes"] - early_mem["peak_bytes"]
                rows.append([case, side, str(sample.num_tokens), f"{early_mem['kept_bytes'] / MIB:.1f}",
                             f"{full_mem['kept_bytes'] / MIB:.1f}", f"{early_mem['peak_bytes'] / MIB:.1f}",
                             f"{full_mem['peak_bytes'] / MIB:.1f}", f"{saved / MIB:.1f}",
                             "yes" if entry["bit_identical"] else "NO"])
                del inputs, early, full
            del sample
    method = ("CUDA max allocated above the start" if device.type == "cuda"
              else "RSS sampled every 1 ms above the start, after malloc_trim (early exit first)")
    print_table(f"Early-exit forward vs full hidden states, {results['machine']['device']}, {opts.dtype_name}, "
                f"config {opts.config}; peak: {method}",
                ["case", "model", "tokens", "kept MiB early", "kept MiB full", "peak MiB early", "peak MiB full",
                 "saved MiB", "same bits"], rows)
    if not all(entry["bit_identical"] for entry in results["early_exit"]):
        log("  early-exit features differ from hidden_states[-2] of the full forward")
