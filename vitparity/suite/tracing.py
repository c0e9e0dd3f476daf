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
from ..trace import LayerTrace, trace_pack
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
    there) or of a group (each failing case inside its pack).

    Inside a pack, the first trace asked of a group traces every case of the pack that fails, with one forward of
    the packing model on the pack; the group's other failing tests take their traces from it (kept with the
    group's results, dropped with them).
    """
    report_dir = session.settings.report_dir
    if isinstance(result, CaseResult):  # traced where its packing features came from: alone, or in its pack
        group = session.group_result(session.plan.group_of(result.case.id))
        plot = report_dir / f"{result.case.id}-layers.png"
        if result.packing_source == "alone" or result.case.id not in group.packed_ids:
            return _report(_trace(session, [result.case], pack=None), [result.case.id], plot)
        failing = [case_id for case_id, case in group.cases.items()
                   if case.comparison is not None and not case.comparison.passed]
        return _in_pack(session, group, [result.case.id, *failing], [result.case.id], plot)
    failing = [case_id for case_id, c in zip(result.packed_ids, result.packed_vs_hf) if not c.passed]
    return _in_pack(session, result, failing, failing, report_dir / f"{result.group.id}-layers.png")


def trace_against_reference(session: ParitySession, result: CaseResult, odd_one_out: str) -> TraceReport:
    """Trace the odd one(s) out of a failing reference test against vitparity's own classes on the hf weights,
    alone: a release packing model against the reference's non-packing class, a release hf model against the
    reference's packing class (`ParitySession.reference_models`); a common-mode fault traces both."""
    reference_hf, reference_packing = session.reference_models()
    hf, packing = session.forward_models()
    sides = ("hf", "packing") if odd_one_out in ("common mode", "hf and packing") else (odd_one_out,)
    found: dict[str, LayerTrace | str] = {}
    for side in sides:
        traced = _trace(session, [result.case], pack=None, suffix=f" ({side} vs the reference)",
                        models=(hf.model, reference_packing) if side == "hf" else (reference_hf, packing.model),
                        labels=("hf", "reference") if side == "hf" else ("reference", "packing"))
        found[side] = traced[result.case.id]
    return _report(found, list(sides), session.settings.report_dir / f"{result.case.id}-vs-reference-layers.png")


def _in_pack(session: ParitySession, group: GroupResult, wanted: list[str], shown: list[str],
             plot: Path) -> TraceReport:
    """The traces of `shown` inside the group's pack; the `wanted` ones not traced yet are traced together."""
    missing = [case.id for case in group.group.cases if case.id in wanted and case.id not in group.pack_traces]
    if missing:
        pack = [case for case in group.group.cases if case.id in group.packed_ids]
        group.pack_traces.update(_trace(session, [c for c in group.group.cases if c.id in missing], pack=pack))
    return _report(group.pack_traces, shown, plot)


def _report(found: dict[str, LayerTrace | str], shown: list[str], plot: Path) -> TraceReport:
    """The TraceReport of `shown` (keys of `found`: a trace, or why there is none), with its PNG."""
    traces = tuple(found[key] for key in shown if isinstance(found[key], LayerTrace))
    problems = tuple(found[key] for key in shown if isinstance(found[key], str))
    written = write_layer_trace_plot(traces, plot, title=f"{plot.stem.removesuffix('-layers')}: min cosine per "
                                     "hidden state") if traces else None
    return TraceReport(traces, problems, written)


def _trace(session: ParitySession, cases: list[ParityCase], *, pack: list[ParityCase] | None,
           models: tuple[torch.nn.Module, torch.nn.Module] | None = None, suffix: str = "",
           labels: tuple[str, str] = ("hf", "packing")) -> dict[str, LayerTrace | str]:
    """Case id -> its trace (or why it has none): inside `pack` (one packing forward for all), or each alone.
    `models`: the (non-packing, packing) pair traced (default: the run's two models); `suffix`: added to each
    trace's name (traces alone only) and `labels` name its sides."""
    hf, packing = models or tuple(loaded.model for loaded in session.forward_models())
    settings = session.settings
    found: dict[str, LayerTrace | str] = {}
    samples: dict[str, Sample] = {}
    for case in pack if pack is not None else cases:
        try:
            samples[case.id] = session.decode_sample(case)
        except MediaError as err:
            found[case.id] = f"per-layer trace of {case.id}: cannot decode it again: {err}"
    traced = [case for case in cases if case.id in samples]
    if not traced:
        return found
    targets = [replace(samples[c.id], name=samples[c.id].name + suffix) if suffix else samples[c.id] for c in traced]
    session.cost.layer_traces += len(traced)
    try:
        traces = trace_pack(hf, packing, targets, pack=list(samples.values()) if pack is not None else None,
                            threshold=settings.threshold, temporal_context=session.pair().temporal_context,
                            bars=settings.bars, labels=labels)
    except (RuntimeError, ValueError, TypeError, AttributeError) as err:  # the verdict stands; say why
        return found | {c.id: f"per-layer trace of {c.id} failed: {type(err).__name__}: {err}" for c in traced}
    return found | {case.id: trace for case, trace in zip(traced, traces)}
