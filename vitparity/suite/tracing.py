"""Per-layer traces of a failing test's cases: where along the encoder the two models part ways.

Runs only when a parity comparison fails, so a passing run pays nothing. The group's features are not kept, so
each failing case is decoded again and traced through both models with every hidden state (vitparity.trace);
a case that failed inside its pack is traced inside the same pack. The traces go into the failure text, the
test's JUnit properties, and one PNG (min cosine per layer, one line per case) next to the heat maps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..extract import Sample
from ..media import MediaError
from ..report import write_layer_trace_plot
from ..trace import LayerTrace, trace_layers
from .cases import ParityCase
from .session import CaseResult, GroupResult, ParitySession


@dataclass(frozen=True)
class TraceReport:
    """The traces of one failing test's cases, what could not be traced, and the PNG written."""

    traces: tuple[LayerTrace, ...]
    problems: tuple[str, ...]
    plot: Path | None

    def format(self) -> str:
        parts = [trace.format() for trace in self.traces] + list(self.problems)
        if self.plot is not None:
            parts.append(f"layer plot: {self.plot}")
        return "\n\n".join(parts)

    def properties(self) -> list[tuple[str, str]]:
        """JUnit properties: each trace's figures (LayerTrace.properties), and the PNG."""
        found = [pair for trace in self.traces for pair in trace.properties()]
        if self.plot is not None:
            found.append(("layer_trace_plot", str(self.plot)))
        return found


def trace_failure(session: ParitySession, result: CaseResult | GroupResult) -> TraceReport:
    """Trace the failing comparison(s) of a case (alone, or inside its pack when its packing features came from
    there) or of a group (each failing case inside its pack)."""
    report_dir = session.settings.report_dir
    if isinstance(result, CaseResult):  # traced where its packing features came from: alone, or in its pack
        pack = None if result.packing_source == "alone" else list(session.plan.group_of(result.case.id).cases)
        return _trace(session, [result.case], pack=pack, plot=report_dir / f"{result.case.id}-layers.png")
    failing = {case_id for case_id, c in zip(result.packed_ids, result.packed_vs_hf) if not c.passed}
    cases = [case for case in result.group.cases if case.id in failing]
    pack = [case for case in result.group.cases if case.id in result.packed_ids]
    return _trace(session, cases, pack=pack, plot=report_dir / f"{result.group.id}-layers.png")


def trace_against_reference(session: ParitySession, result: CaseResult, odd_one_out: str) -> TraceReport:
    """Trace the odd one(s) out of a failing reference test against vitparity's own classes on the hf weights,
    alone: a release packing model against the reference's non-packing class, a release hf model against the
    reference's packing class (`ParitySession.reference_models`); a common-mode fault traces both."""
    reference_hf, reference_packing = session.reference_models()
    hf, packing = session.forward_models()
    sides = ("hf", "packing") if odd_one_out in ("common mode", "hf and packing") else (odd_one_out,)
    reports = [_trace(session, [result.case], pack=None, plot=None, suffix=f" ({side} vs the reference)",
                      models=(hf.model, reference_packing) if side == "hf" else (reference_hf, packing.model),
                      labels=("hf", "reference") if side == "hf" else ("reference", "packing"))
               for side in sides]
    traces = tuple(trace for report in reports for trace in report.traces)
    plot = session.settings.report_dir / f"{result.case.id}-vs-reference-layers.png"
    return TraceReport(traces, tuple(problem for report in reports for problem in report.problems),
                       _plot(traces, plot) if traces else None)


def _trace(session: ParitySession, cases: list[ParityCase], *, pack: list[ParityCase] | None,
           plot: Path | None, models: tuple[torch.nn.Module, torch.nn.Module] | None = None,
           suffix: str = "", labels: tuple[str, str] = ("hf", "packing")) -> TraceReport:
    """`models`: the (non-packing, packing) pair traced (default: the run's two models); `suffix`: added to each
    trace's name (traces alone only) and `labels` name its sides; `plot`: where the PNG goes (None: none
    written)."""
    hf, packing = models or tuple(loaded.model for loaded in session.forward_models())
    settings = session.settings
    problems: list[str] = []
    samples: dict[str, Sample] = {}
    for case in pack if pack is not None else cases:
        try:
            samples[case.id] = session.decode_sample(case)
        except MediaError as err:
            problems.append(f"per-layer trace of {case.id}: cannot decode it again: {err}")
    traces = []
    for case in cases:
        if case.id not in samples:
            continue
        sample = samples[case.id]
        session.cost.layer_traces += 1
        try:
            traces.append(trace_layers(
                hf, packing, replace(sample, name=sample.name + suffix) if suffix else sample,
                pack=list(samples.values()) if pack is not None else None,
                threshold=settings.threshold, temporal_context=session.pair().temporal_context, bars=settings.bars,
                labels=labels,
            ))
        except (RuntimeError, ValueError, TypeError, AttributeError) as err:  # the verdict stands; say why
            problems.append(f"per-layer trace of {case.id} failed: {type(err).__name__}: {err}")
    written = _plot(traces, plot) if traces and plot is not None else None
    return TraceReport(tuple(traces), tuple(problems), written)


def _plot(traces: list[LayerTrace] | tuple[LayerTrace, ...], plot: Path) -> Path | None:
    return write_layer_trace_plot(traces, plot, title=f"{plot.stem.removesuffix('-layers')}: min cosine per hidden state")
