"""The float32 probe of a bfloat16 or float16 run: one case of the run again by both models in float32.

In 16-bit the faults that move features by less than 1 % in direction (a softmax scale a few percent off, a bias
lost in conversion, weights rounded through bfloat16) sit inside the dtype's own noise, so no bar on the 16-bit
comparison can tell them from rounding. The probe loads the same two checkpoints again in float32 (same device,
same attention implementation, TF32 off), runs the run's smallest case (of the selected
`test_parity` cases, `vitparity.suite.cases.float32_probe_case`; one process of the run holds it, whatever the
workers and shards) through each model alone, and judges the pair by the threshold and the float32 bars
(`Settings.probe_bars`). The float32 models are dropped as soon as the probe is done; the probe's loads, forwards
and tokens are counted in the cost line.
"""

from __future__ import annotations

import torch

from ..compare import Comparison, compare_features
from ..extract import extract_hf, extract_packing, prepare_sample
from ..media import Media
from ..models.packed_attention import attention_record
from ..numerics import pinned_float32
from ..pair import ModelPair, PairFiles
from .costs import Cost
from .settings import Settings


def load_float32_pair(files: PairFiles, settings: Settings, cost: Cost) -> ModelPair:
    """Both checkpoints loaded again in float32 on the run's device (loads counted in `cost.probe_loads`)."""

    def count(side: str, ref) -> None:
        cost.probe_loads += 1

    return files.load(dtype=torch.float32, device=settings.device, trust_remote_code=settings.trust_remote_code,
                      strict_config=settings.strict_config, strict_buffers=settings.strict_buffers,
                      check_weights=False, on_load=count)


def run_probe(files: PairFiles, settings: Settings, cost: Cost, name: str, media: Media) -> tuple[Comparison, str]:
    """The float32 comparison of one case (`name`, decoded `media`) and what ran ("float32 probe of <case>
    (<tokens> tokens): packed backend ...", `attention_record`).

    Raises what loading raises (ModelLoadError and its kinds): the caller fails the case's test with it.
    """
    pair = load_float32_pair(files, settings, cost)
    try:
        ran = attention_record(pair.packing.model)
        sample = prepare_sample(media, patch_size=pair.patch_size, dtype=torch.float32, device=settings.device,
                                temporal_context=pair.temporal_context, name=name,
                                normalization=pair.normalization)
        with pinned_float32(settings.device, torch.float32), torch.inference_mode():
            hf = extract_hf(pair.hf.model, sample, temporal_context=pair.temporal_context)
            packing = extract_packing(pair.packing.model, [sample])[0]
        cost.probe_forwards += 2
        cost.probe_tokens += 2 * sample.num_tokens
        comparison = compare_features(hf, packing, name=f"fp32 probe/{name}", threshold=settings.threshold,
                                      bars=settings.probe_bars)
        return comparison, f"float32 probe of {name} ({sample.num_tokens} tokens): {ran}"
    finally:
        del pair
        if settings.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
