"""Per-layer divergence trace: where along the encoder do the two implementations part ways?

One sample goes through both models with every hidden state kept (`output_hidden_states=True`, the inputs
built by vitparity.extract exactly as for the features). `hidden_states[i]` (0: the embedding output, i: the
output of layer i) of the two sides are compared in float32, token by token: min and mean cosine and max abs
difference. The first index whose min cosine is not above the threshold is the first divergence, and three
common patterns are named in plain words:

- "hidden_states shifted by one": one side's `[i]` matches the other's `[i + 1]` at every index;
- "layer count differs": the tuples have different lengths (the common prefix is still compared), or one
  side has a layer that returns its input unchanged (a skipped layer) where the other's does not;
- "temporal positions": a video diverges after an embedding output that agrees, while its first frame
  traced in its place (temporal position 0, spatial positions unchanged, the same pack) agrees at every
  layer. The tokens of the first frame of the video itself diverge too: attention spans all frames, so wrong
  positions of later frames reach the first frame's tokens at the first layer (docs/detection.md,
  "Per-layer trace").

Layers are named by their hidden state: layer K is hidden_states[K], the output of encoder.layers[K-1]; layer 0 is
the embedding output. Where no pattern explains a divergence at layer K >= 1, vitparity.steps says what departs first
inside that layer (one more forward per side); `divergence_words` is the one wording of the result, used by the
failure text, the JUnit properties, the layer plot and `vitparity report-junit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch

from .compare import DEFAULT_THRESHOLD, Comparison, compare_features
from .precision import Bars
from .extract import TEMPORAL_CONTEXT, Sample, hf_hidden_states, packing_hidden_states
from .steps import StepDiagnosis, diagnose

SHIFTED = "hidden_states shifted by one"
LAYER_COUNT = "layer count differs"
TEMPORAL = "temporal positions"
PATTERNS = (SHIFTED, LAYER_COUNT, TEMPORAL)


@dataclass(frozen=True)
class LayerRow:
    """hidden_states[index] of both sides compared token by token (float32)."""

    index: int
    min_cos: float
    mean_cos: float
    max_abs: float
    passed: bool  # min cosine above the threshold, every value finite, same shape

    @classmethod
    def from_comparison(cls, index: int, comparison: Comparison) -> "LayerRow":
        return cls(index, comparison.min_cos, comparison.mean_cos, comparison.max_abs, comparison.passed)


@dataclass(frozen=True)
class Pattern:
    """A recognised divergence pattern: its name (one of PATTERNS) and what was seen."""

    name: str
    detail: str


@dataclass(frozen=True)
class LayerTrace:
    """The per-layer comparison of one sample; `first_divergence` is None when every hidden state agrees."""

    name: str
    threshold: float
    dtype: str
    device: str
    hf_count: int  # number of hidden states each side returned
    packing_count: int
    rows: tuple[LayerRow, ...]  # the common prefix, index 0 .. min(counts) - 1
    first_divergence: int | None
    patterns: tuple[Pattern, ...] = ()
    labels: tuple[str, str] = ("hf", "packing")  # what the two sides are (e.g. "packing", "reference")
    diagnosis: StepDiagnosis | None = None  # what departs first inside the first diverging layer (vitparity.steps)

    @property
    def pattern_names(self) -> list[str]:
        return [pattern.name for pattern in self.patterns]

    def divergence(self) -> str:
        """The first divergence in words (`divergence_words`)."""
        return divergence_words(self.first_divergence, self.diagnosis, self.patterns)

    def format(self) -> str:
        """A `first divergence: layer K, <step>: <cause>` line, the patterns, the steps of that layer, then one table
        row per layer (layer K = hidden_states[K], said once in the head line)."""
        head = (
            f"per-layer trace of {self.name} ({self.dtype}, {self.device}, threshold {self.threshold}): "
            f"{self.labels[0]} {self.hf_count} hidden states, {self.labels[1]} {self.packing_count} "
            "(layer K = hidden_states[K], the output of encoder.layers[K-1]; layer 0 = the embedding output)"
        )
        verdict = f"first divergence: {self.divergence()}"
        if self.first_divergence is None:
            verdict += f" (layers 0..{len(self.rows) - 1} agree)"
        lines = [head, verdict]
        lines += [f"pattern: {p.name}: {p.detail}" for p in self.patterns]
        if self.diagnosis is not None:
            lines.append(self.diagnosis.format(self.labels))
        lines.append(f"{'layer':>5}  {'min cos':>9}  {'mean cos':>9}  {'max abs':>9}")
        for row in self.rows:
            mark = "  <- first divergence" if row.index == self.first_divergence else ""
            lines.append(
                f"{row.index:>5}  {_num(row.min_cos, '9.6f')}  {_num(row.mean_cos, '9.6f')}  "
                f"{_num(row.max_abs, '9.3e')}{mark}"
            )
        longer = max(self.hf_count, self.packing_count)
        if longer > len(self.rows):
            side = self.labels[0] if self.hf_count > self.packing_count else self.labels[1]
            lines.append(f"{len(self.rows):>5}  only {side} returns layers {len(self.rows)}..{longer - 1}")
        return "\n".join(lines)

    def properties(self) -> list[tuple[str, str]]:
        """Small name / value pairs for JUnit (the suite's record_figure): first divergence (its layer, and in
        words), patterns, per-layer figures."""
        prefix = f"trace[{self.name}]"
        first = "none" if self.first_divergence is None else str(self.first_divergence)
        return [
            (f"{prefix} first_divergence", first),
            (f"{prefix} divergence", self.divergence()),
            (f"{prefix} patterns", "; ".join(self.pattern_names) or "none"),
            (f"{prefix} hidden_states", f"{self.labels[0]} {self.hf_count}, {self.labels[1]} {self.packing_count}"),
            (f"{prefix} min_cos", ",".join(_num(row.min_cos, ".6f") for row in self.rows)),
            (f"{prefix} max_abs", ",".join(_num(row.max_abs, ".3e") for row in self.rows)),
        ]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (non-finite numbers as None), e.g. for metadata.json; `from_json` reads it back."""
        return {
            "name": self.name,
            "threshold": self.threshold,
            "dtype": self.dtype,
            "device": self.device,
            "hf_count": self.hf_count,
            "packing_count": self.packing_count,
            "first_divergence": self.first_divergence,
            "labels": list(self.labels),
            "patterns": [{"name": p.name, "detail": p.detail} for p in self.patterns],
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_json(),
            "layers": [
                {"index": r.index, "min_cos": _finite(r.min_cos), "mean_cos": _finite(r.mean_cos),
                 "max_abs": _finite(r.max_abs), "passed": r.passed}
                for r in self.rows
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerTrace":
        """The trace `to_json` wrote; ValueError naming the missing or malformed field otherwise."""

        def num(value: float | None) -> float:
            return math.nan if value is None else float(value)

        try:
            rows = tuple(
                LayerRow(r["index"], num(r["min_cos"]), num(r["mean_cos"]), num(r["max_abs"]), r["passed"])
                for r in data["layers"]
            )
            patterns = tuple(Pattern(p["name"], p["detail"]) for p in data["patterns"])
            diagnosis = data.get("diagnosis")
            return cls(data["name"], data["threshold"], data["dtype"], data["device"], data["hf_count"],
                       data["packing_count"], rows, data["first_divergence"], patterns,
                       tuple(data.get("labels", ("hf", "packing"))),
                       None if diagnosis is None else StepDiagnosis.from_json(diagnosis))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed layer trace record ({type(error).__name__}: {error})") from None


def divergence_words(first: int | None, diagnosis: StepDiagnosis | None, patterns: Sequence[Pattern] = ()) -> str:
    """The first divergence in one line, the same in the failure text, JUnit, the layer plot and report-junit:
    `none`, `layer 0 (the embedding output)`, `layer 2: layer count differs`, or
    `layer 1, q after RoPE (q before RoPE equal): the rotary embedding, h/w axes (packing)`."""
    if first is None:
        return "none"
    text = "layer 0 (the embedding output)" if first == 0 else f"layer {first}"
    names = ", ".join(pattern.name for pattern in patterns)
    if diagnosis is None:
        return text + (f": {names}" if names else "")
    return f"{text}, {diagnosis.words()}" + (f"; pattern: {names}" if names else "")


def _num(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else format("nan", f">{spec.split('.')[0] or 0}")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _compare(a: torch.Tensor, b: torch.Tensor, threshold: float, bars: Bars | None = None) -> Comparison:
    return compare_features(a, b, threshold=threshold, bars=bars)


def _rows(hf: tuple[torch.Tensor, ...], packing: tuple[torch.Tensor, ...], threshold: float,
          bars: Bars | None = None) -> tuple[LayerRow, ...]:
    return tuple(LayerRow.from_comparison(i, _compare(a, b, threshold, bars))
                 for i, (a, b) in enumerate(zip(hf, packing)))


def _first_divergence(rows: tuple[LayerRow, ...], hf_count: int, packing_count: int) -> int | None:
    """First index not passing; with every common index passing, the first index only one side returns."""
    for row in rows:
        if not row.passed:
            return row.index
    return len(rows) if hf_count != packing_count else None


def _shifted(hf, packing, threshold: float) -> list[Pattern]:
    """One side's [i] agrees with the other's [i + 1] at every index both have (at least two pairs)."""
    found = []
    for early_label, early, late_label, late in (("packing", packing, "hf", hf), ("hf", hf, "packing", packing)):
        pairs = min(len(early), len(late) - 1)
        if pairs >= 2 and all(_compare(late[i + 1], early[i], threshold).passed for i in range(pairs)):
            found.append(Pattern(SHIFTED, (
                f"{early_label} hidden_states[i] matches {late_label} hidden_states[i+1] for i = 0..{pairs - 1} "
                f"({early_label}'s tuple starts one layer late)"
            )))
    return found


def _layer_count(hf, packing) -> list[Pattern]:
    """Different tuple lengths, or a layer that returns its input bit for bit on one side only."""
    if len(hf) != len(packing):
        return [Pattern(LAYER_COUNT, (
            f"hf returns {len(hf)} hidden states ({len(hf) - 1} layers), packing {len(packing)} "
            f"({len(packing) - 1} layers); compared the common hidden_states[0..{min(len(hf), len(packing)) - 1}]"
        ))]
    found = []
    for i in range(len(hf) - 1):
        same = {"hf": torch.equal(hf[i], hf[i + 1]), "packing": torch.equal(packing[i], packing[i + 1])}
        for side, other in (("hf", "packing"), ("packing", "hf")):
            if same[side] and not same[other]:
                found.append(Pattern(LAYER_COUNT, (
                    f"{side} hidden_states[{i + 1}] equals hidden_states[{i}]: its layer {i + 1} "
                    f"(encoder.layers[{i}]) returns its input unchanged where {other}'s changes it: a skipped layer"
                )))
    return found


def _first_frame(sample: Sample) -> Sample:
    """The first frame of a video as a one-frame sample (temporal position 0)."""
    _, h, w = sample.grid
    return Sample(f"{sample.name} frame 0", "image", sample.pixels[:, :1], (1, h, w), [0])


def _slices(pack: list[Sample], samples: list[Sample]) -> list[slice]:
    """Each sample's rows in the pack's hidden states (the pack must hold each sample itself exactly once)."""
    found = []
    for sample in samples:
        matches = [i for i, other in enumerate(pack) if other is sample]
        if len(matches) != 1:
            raise ValueError(
                f"{sample.name}: the pack must hold the traced sample exactly once, found it {len(matches)} times"
            )
        start = sum(s.num_tokens for s in pack[: matches[0]])
        found.append(slice(start, start + sample.num_tokens))
    return found


def _hidden_pairs(hf_model, packing_model, samples: list[Sample], pack: list[Sample] | None,
                  temporal_context: int | None) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """(hf, packing) hidden states of each sample: the hf model on each sample, the packing model once on the pack
    (default: each sample alone)."""
    if pack is None:
        packed = [(packing_hidden_states(packing_model, [sample]), slice(None)) for sample in samples]
    else:
        whole = packing_hidden_states(packing_model, pack)
        packed = [(whole, rows) for rows in _slices(pack, samples)]
    pairs = []
    for sample, (hidden, rows) in zip(samples, packed):
        hf = hf_hidden_states(hf_model, sample, temporal_context=temporal_context)
        packing = tuple(h[rows] for h in hidden)
        for label, states in (("hf", hf), ("packing", packing)):
            for index, h in enumerate(states):
                if h.dim() != 2 or h.shape[0] != sample.num_tokens:
                    raise ValueError(
                        f"{sample.name}: {label} hidden_states[{index}] has shape {tuple(h.shape)}, "
                        f"expected ({sample.num_tokens}, D) for grid {sample.grid}"
                    )
        pairs.append((hf, packing))
    return pairs


@torch.inference_mode()
def trace_layers(
    hf_model: torch.nn.Module,
    packing_model: torch.nn.Module,
    sample: Sample,
    *,
    pack: list[Sample] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    temporal_context: int | None = TEMPORAL_CONTEXT,
    bars: Bars | None = None,
    labels: tuple[str, str] = ("hf", "packing"),
) -> LayerTrace:
    """Trace one sample through both models and compare every hidden state.

    pack: the samples the packing model runs together (must hold `sample` itself once); default the sample
    alone. temporal_context: as for extract_hf (the non-packing model's rope_temporal_size). bars: the precision
    bars each hidden state must also hold (`vitparity.precision`), so that a fault below the threshold is located
    too; the patterns' cross-layer comparisons use the threshold alone. labels: what the text calls the two
    sides (the non-packing model's, the packing model's).
    """
    return trace_pack(hf_model, packing_model, [sample], pack=pack, threshold=threshold,
                      temporal_context=temporal_context, bars=bars, labels=labels)[0]


@torch.inference_mode()
def trace_pack(
    hf_model: torch.nn.Module,
    packing_model: torch.nn.Module,
    samples: list[Sample],
    *,
    pack: list[Sample] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    temporal_context: int | None = TEMPORAL_CONTEXT,
    bars: Bars | None = None,
    labels: tuple[str, str] = ("hf", "packing"),
) -> list[LayerTrace]:
    """`trace_layers` of several samples of one pack, the packing model run once on the pack (not once per
    sample); with `pack` None, each sample alone. One trace per sample, in order."""
    parameter = next(packing_model.parameters())
    found = []
    for sample, (hf, packing) in zip(samples, _hidden_pairs(hf_model, packing_model, samples, pack,
                                                             temporal_context)):
        rows = _rows(hf, packing, threshold, bars)
        first = _first_divergence(rows, len(hf), len(packing))
        patterns: list[Pattern] = []
        if first is not None:
            patterns += _shifted(hf, packing, threshold)
            patterns += _layer_count(hf, packing)
            if sample.kind == "video" and sample.grid[0] > 1 and first > 0 and not patterns:
                frame = _first_frame(sample)
                frame_pack = [frame if other is sample else other for other in pack or [sample]]
                frame_rows = _rows(*_hidden_pairs(hf_model, packing_model, [frame], frame_pack, temporal_context)[0],
                                   threshold, bars)
                if all(row.passed for row in frame_rows):
                    patterns.append(Pattern(TEMPORAL, (
                        f"the video diverges from layer {first} while its first frame in its place "
                        f"(temporal position 0) agrees at every layer: the frames' temporal positions differ"
                    )))
        found.append((sample, hf, packing, rows, first, patterns))
    # Inside the layer, unless a pattern already says what happened (a shifted tuple, a skipped or missing layer).
    asked = [first if first is not None and first < min(len(hf), len(packing))
             and not {SHIFTED, LAYER_COUNT} & {p.name for p in patterns} else None
             for _, hf, packing, _, first, patterns in found]
    diagnoses = diagnose(hf_model, packing_model, samples, asked, pack=pack, temporal_context=temporal_context,
                         threshold=threshold, bars=bars, labels=labels)
    return [LayerTrace(
        name=sample.name, threshold=float(threshold), dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device), hf_count=len(hf), packing_count=len(packing), rows=rows,
        first_divergence=first, patterns=tuple(patterns), labels=labels, diagnosis=diagnosis,
    ) for (sample, hf, packing, rows, first, patterns), diagnosis in zip(found, diagnoses)]
