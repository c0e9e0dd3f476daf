"""Every output users read, from one whole forward per model: the penultimate features (`hidden_states[-2]`, the
main verdict), `last_hidden_state` (after the post-norm) and `pooler_output` (the pooling head), compared between
the two models; the same features compared with an independent reference (vitparity's own classes on the same
weights), naming the odd one out; and the converted weights checked tensor by tensor.

Shapes: features and last_hidden_state (N, D), pooler_output (1, D), all float32 on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compare import Comparison, compare_features
from .convert import ConversionError, hf_to_packing_state_dict
from .extract import FEATURE_LAYER, Sample, hf_inputs, hidden_states_of, model_dtype, packing_inputs

SIDES = ("hf", "packing")
# Bars of the outputs after the penultimate layer (min cosine, strictly greater), from measurement. The post-norm
# rescales every token to unit variance, so a token with a small final output carries the rounding of half-precision
# attention into last_hidden_state: the release-format test pair (tests/remote/release, bundled media, CPU, bf16
# softmax as the release's eager attention) measured a clean min per-token cosine of 0.98469 in bfloat16 (1.000000
# in float32), while a real checkpoint with its last layer's q and k swapped measured 0.962. The pooled vector is
# one per sample: clean 0.99996 in bfloat16, that fault 0.993, a negated head 0.117.
LAST_HIDDEN_HALF_MIN_COS = 0.97  # bfloat16 / float16; float32 uses the features' threshold
POOLER_MIN_COS = 0.999


def output_bars(threshold: float, dtype: str) -> dict[str, float]:
    """Min-cosine bar of last_hidden_state and pooler_output for a run at `threshold` in `dtype`."""
    last = threshold if dtype == "float32" else min(threshold, LAST_HIDDEN_HALF_MIN_COS)
    return {"last_hidden_state": last, "pooler_output": max(threshold, POOLER_MIN_COS)}


@dataclass
class ModelOutputs:
    """One sample's outputs of one model, float32."""

    features: torch.Tensor  # hidden_states[-2], (N, D)
    last_hidden_state: torch.Tensor  # (N, D)
    pooler_output: torch.Tensor | None  # (1, D); None when the model has no head (use_head false)


def _outputs(result, features: torch.Tensor, batch_first: bool) -> ModelOutputs:
    last = result.last_hidden_state
    pooled = getattr(result, "pooler_output", None)
    last = last[0] if batch_first else last
    if pooled is not None:
        pooled = pooled.reshape(1, -1)
    return ModelOutputs(features.float(), last.float(), None if pooled is None else pooled.float())


@torch.inference_mode()
def hf_outputs(model: torch.nn.Module, sample: Sample, *, temporal_context: int | None) -> ModelOutputs:
    """The non-packing model's outputs for one sample, from one whole forward."""
    result = model(**hf_inputs(sample, model_dtype(model), temporal_context=temporal_context),
                   output_hidden_states=True, return_dict=True)
    return _outputs(result, hidden_states_of(result)[FEATURE_LAYER][0], batch_first=True)


@torch.inference_mode()
def packing_outputs(model: torch.nn.Module, samples: list[Sample]) -> list[ModelOutputs]:
    """The packing model's outputs for samples packed into one whole forward, split back per sample
    (pooler_output: one row per sample)."""
    inputs = packing_inputs(samples, model.config.patch_size, model_dtype(model))
    result = model(**inputs, output_hidden_states=True, return_dict=True)
    features, total = hidden_states_of(result)[FEATURE_LAYER], inputs["hidden_states"].shape[0]
    last, pooled = result.last_hidden_state, getattr(result, "pooler_output", None)
    if features.shape[0] != total or last.shape[0] != total:
        raise RuntimeError(f"packing model returned {features.shape[0]} feature tokens and {last.shape[0]} "
                           f"last_hidden_state tokens for {total} input patches")
    if pooled is not None and pooled.shape[0] != len(samples):
        raise RuntimeError(f"packing model returned {pooled.shape[0]} pooler_output rows for {len(samples)} samples")
    sizes = [sample.num_tokens for sample in samples]
    return [ModelOutputs(f.float(), h.float(), None if pooled is None else pooled[i:i + 1].float())
            for i, (f, h) in enumerate(zip(features.split(sizes), last.split(sizes)))]


def compare_outputs(hf: ModelOutputs, packing: ModelOutputs, name: str, bars: dict[str, float]) -> list[Comparison]:
    """last_hidden_state (per token) and pooler_output of the two models, each a Comparison at its bar
    (`output_bars`). A pooler_output that one model gives and the other does not is a failed comparison."""
    found = [compare_features(hf.last_hidden_state, packing.last_hidden_state, name=f"last_hidden_state/{name}",
                              threshold=bars["last_hidden_state"])]
    pooled, bar = f"pooler_output/{name}", bars["pooler_output"]
    if hf.pooler_output is not None and packing.pooler_output is not None:
        found.append(compare_features(hf.pooler_output, packing.pooler_output, name=pooled, threshold=bar))
    elif (hf.pooler_output is None) != (packing.pooler_output is None):
        has = "hf" if hf.pooler_output is not None else "packing"
        found.append(Comparison(pooled, (), (), bar, False, f"only the {has} model returns pooler_output",
                                *(float("nan"),) * 5))
    return found


@dataclass
class ReferenceVerdict:
    """Each model's features against the reference's, and which implementation is the odd one out."""

    comparisons: list[Comparison]  # hf vs reference, packing vs reference
    odd_one_out: str | None  # "hf", "packing", "common mode" (both against the reference), or None: all agree

    @property
    def passed(self) -> bool:
        return self.odd_one_out is None


def reference_verdict(hf: torch.Tensor, packing: torch.Tensor, reference: torch.Tensor, pair_passed: bool,
                      name: str, threshold: float) -> ReferenceVerdict:
    """hf and packing features (N, D) each against the reference's; `pair_passed`: hf vs packing parity held.

    Both apart from the reference while they agree with each other: a common-mode fault (both release files share
    it); one apart: that one is the odd one out; both apart and apart from each other: named as both."""
    found = [compare_features(features, reference, name=f"reference/{side}/{name}", threshold=threshold,
                              labels=(side, "reference"))
             for side, features in (("hf", hf), ("packing", packing))]
    failed = [side for side, comparison in zip(SIDES, found) if not comparison.passed]
    if not failed:
        odd = None
    elif len(failed) == 1:
        odd = failed[0]
    else:
        odd = "common mode" if pair_passed else "hf and packing"
    return ReferenceVerdict(found, odd)


@dataclass
class ConvertedWeights:
    """The converted-weights check: one problem line per tensor that differs, is missing or is extra, and the
    buffers left out (one line each, with the reason)."""

    problems: list[str]
    left_out: list[str]


def converted_weights(hf: torch.nn.Module, packing: torch.nn.Module) -> ConvertedWeights:
    """Each packing tensor of the state dict against the hf tensor(s) it comes from by the converter's mapping
    (`convert.hf_to_packing_state_dict`: fused qkv = cat(q, k, v), the RoPE buffers `video_rope.inv_freq_{t,h,w}` ->
    `rotary_emb.inv_freq_{t,h,w}` where both models keep them), exactly (torch.equal, in the loaded dtype).

    A parameter that one side lacks is a problem. A buffer that only one model keeps in its state dict (a release
    whose code registers its RoPE tables persistent on one side only) maps to nothing: it is left out, with the
    reason; its values are checked where every buffer is, in `test_loaded_weights` (RoPE tables against the
    formula). Non-persistent buffers are in neither state dict."""
    try:
        expected = hf_to_packing_state_dict(hf.state_dict())
    except ConversionError as err:
        return ConvertedWeights([f"the hf weights cannot be mapped: {err}"], [])
    actual = packing.state_dict()
    buffers = {"hf": set(hf_to_packing_state_dict({name: torch.empty(0) for name, _ in hf.named_buffers()})),
               "packing": {name for name, _ in packing.named_buffers()}}
    extra, missing = set(actual) - set(expected), set(expected) - set(actual)
    left_out = [f"{key}: a buffer only the packing model keeps in its state dict, no hf tensor maps to it (checked "
                "by test_loaded_weights)" for key in sorted(extra & buffers["packing"])]
    left_out += [f"{key}: a buffer only the hf model keeps in its state dict, nothing in the packing model to map it to "
                 "(checked by test_loaded_weights)" for key in sorted(missing & buffers["hf"])]
    problems = [f"{key}: in the packing model, no hf tensor maps to it" for key in sorted(extra - buffers["packing"])]
    problems += [f"{key}: mapped from the hf weights, missing in the packing model"
                 for key in sorted(missing - buffers["hf"])]
    for key in sorted(set(actual) & set(expected)):
        a, b = actual[key], expected[key]
        if a.shape != b.shape:
            problems.append(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)} mapped from the hf weights")
        elif not torch.equal(a, b.to(a.device)):
            diff = (a.float() - b.to(a.device).float()).abs()
            problems.append(f"{key}: differs from the hf tensor(s) it maps from: max abs diff {diff.max().item():.3e}, "
                            f"{int((diff > 0).sum())} of {diff.numel()} values ({a.dtype})")
    return ConvertedWeights(problems, left_out)
