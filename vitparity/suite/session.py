"""The suite's state in one process (one per xdist worker): the two models, the pack group being worked on,
and what the run cost.

A pack group is computed in one go when its first test asks for it: its packed forward, its planned companion
swap, each needed case's forwards, the determinism re-runs the policy asks for, the float32 probe when the group
holds the run's probe case, and from them only what the tests read (comparisons, swap verdicts, golden reductions,
determinism verdicts). Each case's hf features come from a forward alone; its packing features from a forward
alone, or, under --companions=sample once the group's own swap has shown bit for bit that neighbours leave a sample
untouched, from its pack (no second packing forward). Nothing a group computes depends on the groups this process
ran before it, so the forwards of a run do not depend on its workers and shards. Features are dropped as soon as
they are compared, and the group's results after its last test, so memory does not grow with the number of cases.
Only a failing test pays for more: its per-layer trace decodes its cases again (vitparity.suite.tracing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ..codec import context_frames, permuted, prepare_codec_sample, token_permutation
from ..codec_assets import folder_sha256, load_assets, prepare_assets_sample
from ..checks import feature_difference, odd_pass, pixel_difference
from ..compare import NEIGHBOUR_MIN_COS, Comparison, compare_features
from ..extract import (Sample, batch_key, extract_hf, extract_hf_batch, extract_packing, hf_inputs, mirrored,
                       prepare_sample, stops_early)
from ..independence import SwapResult, alternate_halves, companion_swap
from ..checkpoint_code import OWN_CODE
from ..code_compare import pair_code_notes
from ..convert import convert_config, hf_to_packing_state_dict
from ..loading import LoadedModel, ModelLoadError, library_versions, load_model
from ..media import Media, MediaError, decoder_record, load_media
from ..models import OneVisionEncoderPackingModel
from ..models.packed_attention import attention_record
from ..outputs import (ConvertedWeights, ModelOutputs, ReferenceVerdict, compare_outputs, converted_weights,
                       hf_outputs, output_bars, packing_outputs, reference_verdict)
from ..pair import SIDES, ModelPair, PairFiles, SideLoadError, preflight_pair
from ..report import format_report, write_cosine_heatmap
from ..trace import LayerTrace
from ..snapshots import GoldenData, GoldenFolder, file_sha256, model_fingerprint, reduce_features
from .baseline import Baseline
from .cases import PackGroup, ParityCase, Probe
from .settings import Settings
from .costs import Cost
from .probe import run_probe
from .schedule import GRID_KINDS, GroupNeeds, Plan, grid_cases



@dataclass
class CaseResult:
    """What the tests of one case read: its comparison, golden reductions and determinism verdict."""

    case: ParityCase
    error: str | None = None  # the media cannot be read: every test of the case fails with this
    comparison: Comparison | None = None
    grid: tuple[int, int, int] = (0, 0, 0)
    metadata: dict = field(default_factory=dict)
    reductions: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = field(default_factory=dict)
    determinism: list[str] | None = None  # problems found; None when the policy did not re-run the case
    packing_source: str = "alone"  # the forward its packing features come from: "alone" or "<group id> (...)"
    determinism_forwards: str = ""  # the forwards the determinism verdict compared
    probe: Comparison | None = None  # the float32 probe of a 16-bit run, when this case carries the run's probe
    probe_error: str | None = None  # why the float32 probe of this case could not run
    probe_forwards: str = ""  # what the probe ran
    paths: list[Comparison] = field(default_factory=list)  # the hf explicit-positions path vs the other forwards
    token_order: list[Comparison] = field(default_factory=list)  # each path fed shuffled, restored, vs in order
    outputs: list[Comparison] | None = None  # last_hidden_state and pooler_output, hf vs packing
    # each model's features vs vitparity's own classes, or why the reference could not run
    reference: ReferenceVerdict | str | None = None
    batch: list[Comparison] = field(default_factory=list)  # its hf features alone vs its row of an hf batch
    batch_forwards: str = ""  # the batch it ran in

    @property
    def comparisons(self) -> list[Comparison]:
        """What test_parity records: the run's comparison, and the float32 probe's when this case carries it."""
        return [c for c in (self.comparison, self.probe) if c is not None]

    @property
    def passed(self) -> bool:
        """The run's comparison and, when there is one, the float32 probe pass."""
        return all(c.passed for c in self.comparisons) and self.probe_error is None

    def forwards(self, test: str) -> str:
        """The forwards a test of this case compared (recorded with the test)."""
        if test == "test_deterministic":
            return self.determinism_forwards
        if test == "test_input_paths":
            return "; ".join(comparison.name for comparison in self.paths)
        if test == "test_token_order":
            return "; ".join(comparison.name for comparison in self.token_order)
        if test == "test_outputs":
            return "hf alone vs packing alone, whole forwards (the features' own forwards)"
        if test == "test_reference":
            return ("hf alone and packing alone vs vitparity's own classes on the hf checkpoint's weights "
                    "(early-exit forward)")
        probe = f"; {self.probe_forwards}" if test == "test_parity" and self.probe_forwards else ""
        return f"hf alone vs packing {self.packing_source}{probe}"


@dataclass
class GroupResult:
    """The group's cases, and its packed forward compared with each case run alone through each model."""

    group: PackGroup
    cases: dict[str, CaseResult]
    packed_vs_hf: list[Comparison]
    packed_vs_alone: list[Comparison]
    left_out: dict[str, str]  # case id -> why its media could not join the pack
    packed_ids: list[str] = field(default_factory=list)  # the case of each packed_vs_hf comparison
    companions: list[SwapResult] = field(default_factory=list)  # one verdict per case the swap queried
    swap_forwards: str = ""  # the forwards the swap compared
    pack_traces: dict[str, LayerTrace | str] = field(default_factory=dict)  # case id -> its layer trace in the pack
    grid_call: list[Comparison] = field(default_factory=list)  # per case: explicit grid positions vs grid_thw only
    grid_left_out: dict[str, str] = field(default_factory=dict)  # case id -> why the grid call leaves it out
    grid_forwards: str = ""  # the two packing forwards the grid call compared

    def forwards(self, test: str) -> str:
        """The forwards a test of this group compared (recorded with the test)."""
        if test == "test_companions_do_not_leak":
            return self.swap_forwards
        if test == "test_packing_independent_of_neighbours":
            return f"packing alone vs packing in {self.group.id}"
        return f"hf alone vs packing in {self.group.id}"


def pair_files(settings: Settings) -> PairFiles:
    """Both checkpoints resolved and their config files checked (`vitparity.pair.preflight_pair`)."""
    return preflight_pair(settings.hf_model, settings.packing_model, num_frames=settings.num_frames,
                          num_frames_name=settings.labels["num_frames"], strict_config=settings.strict_config,
                          trust_remote_code=settings.trust_remote_code, own_classes=settings.own_classes)


def preflight(settings: Settings) -> PairFiles:
    """What is known about the pair before any test (`vitparity.pair.preflight_pair`: checkpoints that cannot be
    found or fetched, a checkpoint with code of its own and neither --trust-remote-code nor --own-classes, code that
    cannot be imported, unreadable config files, swapped sides, configs that differ, frames vs temporal context,
    normalisation) is one usage error at start, as in the CLI, instead of the same failure in every test."""
    try:
        return pair_files(settings)
    except ModelLoadError as err:
        raise pytest.UsageError(str(err)) from None


class ParitySession:
    """Per-process state: settings, plan, models, the current group's results and the cost of the run."""

    def __init__(self, settings: Settings, plan: Plan, files: PairFiles) -> None:
        self.settings = settings
        self.plan = plan
        self.needs: dict[str, GroupNeeds] = {}
        self.left_out: dict[str, list[str]] = {}  # why the plan deselected tests: reason -> test names
        self.cost = Cost()
        self._files = files
        self._pair: ModelPair | None = None
        self._model_error: tuple[str | None, str] | None = None  # (the side that failed, or None: both), message
        self._golden_folders: dict[str, Path] = {}
        self.baseline: Baseline | None = None  # --golden-baseline, checked (set by the plugin)
        self._current: GroupResult | None = None
        self._reference: LoadedModel | None = None
        self._reference_error: str | None = None
        self._reference_packing: torch.nn.Module | None = None
        self._converted: ConvertedWeights | None = None

    # models

    def models(self) -> tuple[LoadedModel, LoadedModel]:
        """Both models, loaded once; the pair rules (`vitparity.pair`) hold before any forward pass.

        A pair that cannot be loaded fails every test that needs it with the same clear message (tried once).
        """
        pair = self.pair()
        return pair.hf, pair.packing

    def pair(self, side: str | None = None) -> ModelPair:
        """The loaded model pair (see `models`). A test about one `side` whose failure comes from the other side's
        checkpoint says so."""
        if self._model_error is None and self._pair is None:
            s = self.settings
            try:
                self._pair = self._files.load(
                    dtype=s.torch_dtype, device=s.device, strict_config=s.strict_config, strict_buffers=s.strict_buffers, check_weights=False,
                    on_load=self._count_load,
                )
            except SideLoadError as err:
                self._model_error = (err.side, str(err))
            except ModelLoadError as err:
                self._model_error = (None, str(err))
        if self._model_error is not None:
            failed, message = self._model_error
            if side is not None and failed is not None and failed != side:
                message = f"the {side} model is not checked: the {failed} model did not load: {message}"
            pytest.fail(message, pytrace=False)
        return self._pair

    def code(self) -> dict:
        """Side -> the code that runs it (`checkpoint_code.CodeRecord`), chosen and imported at preflight."""
        return dict(self._files.code or {})

    def code_notes(self) -> list[str]:
        """The shared parts (RoPE, attention scale, MLP, norms) the two checkpoints' own code writes differently,
        one line each, read before any forward (`code_compare.pair_code_notes`); a note, never a verdict."""
        return pair_code_notes(self._files)

    def config_warnings(self) -> list[str]:
        """Config differences that change only numerics, once the pair is loaded (else none)."""
        return list(self._pair.config_warnings) if self._pair is not None else []

    def restored_buffers(self) -> list[str]:
        """`side: buffer` of each non-persistent buffer restored after loading, once the pair is loaded (else none)."""
        if self._pair is None:
            return []
        return [f"{side}: {name}" for side in SIDES for name in self._pair.side(side).restored_buffers]

    def _count_load(self, side: str, ref) -> None:
        self.cost.loads[side] += 1

    def model(self, side: str) -> LoadedModel:
        return self.pair(side).side(side)

    def forward_models(self) -> tuple[LoadedModel, LoadedModel]:
        """Both models, what their attention runs recorded once for the goldens' provenance."""
        hf, packing = self.models()
        self.cost.attention = self.cost.attention or attention_record(packing.model)
        return hf, packing

    def weight_problems(self, side: str | None = None) -> dict[str, list[str]]:
        """Side -> problems of its loaded parameters and buffers (`loaded_model_problems`), found once; `side`: the
        test is about that side (see `pair`)."""
        return self.pair(side).weight_problems()

    # cases and groups

    def load_case_media(self, case: ParityCase) -> Media:
        """Decode the case's image or video (frames sampled and aligned to the models' patch size); a codec-style
        case samples the whole temporal context (64 frames) at native size; a codec asset folder gives its mosaics
        and positions, checked (`vitparity.codec_assets.load_assets`)."""
        s = self.settings
        if case.kind == "assets":
            return load_assets(case.path, patch_size=self.pair().patch_size)
        frames = (context_frames(self.pair().temporal_context) if case.kind == "codec"
                  else case.frames if case.kind == "video" else s.num_frames)
        return load_media(case.path, num_frames=frames, patch_size=self.pair().patch_size, align=s.align,
                          scale=case.scale)

    def decode_sample(self, case: ParityCase) -> Sample:
        """The case's model inputs made again from its file (for a failing case's trace: features are not kept)."""
        return self._sample(case, self.load_case_media(case))

    def _sample(self, case: ParityCase, media: Media) -> Sample:
        s, pair = self.settings, self.pair()
        if case.kind == "assets":
            return prepare_assets_sample(media, patch_size=pair.patch_size, dtype=s.torch_dtype, device=s.device,
                                         name=case.id, normalization=pair.normalization)
        if case.kind == "codec":
            try:
                return prepare_codec_sample(
                    media, patch_size=pair.patch_size, budget_frames=s.codec_frames, dtype=s.torch_dtype,
                    device=s.device, name=case.id, normalization=pair.normalization,
                )
            except ValueError as err:
                raise MediaError(case.path, f"codec-style selection: {err}") from None
        return prepare_sample(
            media, patch_size=pair.patch_size, dtype=s.torch_dtype, device=s.device,
            temporal_context=pair.temporal_context, name=case.id, normalization=pair.normalization,
        )

    def _forward(self, side: str, sample: Sample, *, path: str = "context") -> torch.Tensor:
        """Features of one model for one sample alone; the hf model is called the `path` way (`extract.hf_inputs`)."""
        model = self.model(side).model
        self.cost.count(side, sample.num_tokens)
        if side == "hf":
            return extract_hf(model, sample, temporal_context=self.pair().temporal_context, path=path)
        return extract_packing(model, [sample])[0]

    def _input_paths(self, case: ParityCase, sample: Sample, first: dict[str, torch.Tensor]) -> list[Comparison]:
        """The release's explicit-positions call (path 2: the sample's own frames, a codec case's mosaics, with
        `patch_positions`) compared token for token with the hf model's context call (path 1, or path 3's sparse
        `visible_indices`) and with the packing model."""
        explicit = self._forward("hf", sample, path="positions")
        context = "sparse visible_indices" if sample.context is not None else "64-frame context"
        label = "patch_positions" + (" on mosaics" if sample.context is not None else "")
        threshold = self.settings.threshold
        return [
            compare_features(first["hf"], explicit, name=f"pos~ctx/{case.id}",
                             threshold=threshold, labels=(f"hf {context}", f"hf {label}")),
            compare_features(explicit, first["packing"], name=f"pos~packing/{case.id}",
                             threshold=threshold, labels=(f"hf {label}", "packing")),
        ]

    def _batches(self, samples: dict[str, Sample],
                 alone: dict[str, torch.Tensor]) -> dict[str, tuple[list[Comparison], str]]:
        """Case id -> its hf features alone (`alone`, (N, D) float32) compared with its row of one hf forward of a
        batch, and what ran: the `samples` of the same input shape (`extract.batch_key`) share a batch; a sample
        with no other of its shape is batched with its mirror image (`extract.mirrored`, same shape, other pixels),
        so a fault that mixes rows of a batch shows in every case.

        Within the dtype's bars, as any other comparison of the run, not bit for bit: a batch may take other GEMM and
        attention tilings than one sample. Measured 2026-12-08 (2-core CPU box, vitparity's classes, float32): every
        bundled case equals its batched row exactly at native size, but the 6-token `image-coffee_small.jpg@0.5`
        differs by 5.96e-06 (min cos 1.0000000), so exactness is no rule. A fault that mixes the rows of a batch moves
        a row far past the bars (tests/faults/release.py, `batch_rows_mixed`)."""
        model, context = self.model("hf").model, self.pair().temporal_context
        dtype = next(model.parameters()).dtype
        shapes: dict[tuple, list[Sample]] = {}
        for sample in samples.values():
            shapes.setdefault(batch_key(hf_inputs(sample, dtype, temporal_context=context)), []).append(sample)
        found = {}
        for batch in shapes.values():
            members = batch if len(batch) > 1 else [batch[0], mirrored(batch[0])]
            self.cost.count("hf", sum(sample.num_tokens for sample in members))
            rows = extract_hf_batch(model, members, temporal_context=context)
            names = " + ".join(sample.name for sample in members)
            for sample, row in zip(members, rows):
                if sample.name not in alone:
                    continue
                self.cost.batched_cases += 1
                self.cost.path_tokens += sample.num_tokens
                comparison = compare_features(alone[sample.name], row, name=f"batch/{sample.name}",
                                              threshold=self.settings.threshold, bars=self.settings.bars,
                                              labels=("hf alone", f"hf in a batch of {len(members)}"))
                found[sample.name] = ([comparison], f"hf alone vs hf batch [{names}]")
        return found

    def _grid_call(self, samples: list[Sample]) -> tuple[list[Comparison], str]:
        """The packing model's documented call (`grid_thw` only: the model computes each sample's positions) against
        its call with those positions given (`extract.grid_positions`: t = 0..T-1, h, w row-major), the same pack
        of `samples`, compared per sample bit for bit: the same integer positions give the same RoPE tables, and the
        rest of the two forwards is the same, in any dtype and on any device. Also what ran."""
        model = self.model("packing").model
        tokens = sum(sample.num_tokens for sample in samples)
        explicit = extract_packing(model, samples, positions="grid")
        documented = extract_packing(model, samples, positions="none")
        self.cost.count("packing", tokens)
        self.cost.count("packing", tokens)
        self.cost.grid_calls += 1
        # two input paths of each case: grid_thw only, and a video's grid positions given (t = 0..T-1: not its
        # 64-frame context's); an image's grid positions are the positions it is always given (no path of its own)
        self.cost.path_tokens += tokens + sum(sample.num_tokens for sample in samples if sample.kind == "video")
        comparisons = [exactly(compare_features(a, b, name=f"grid/{sample.name}", threshold=self.settings.threshold,
                                                labels=("packing grid positions given", "packing grid_thw only")), a, b)
                       for sample, a, b in zip(samples, explicit, documented)]
        return comparisons, (f"packing with patch_positions from the grid vs packing with grid_thw only, the same "
                             f"pack of {len(samples)} samples ({tokens} tokens), bit for bit")

    def group_result(self, group: PackGroup) -> GroupResult:
        """The group's results, computed when its first test asks (the previous group's are dropped first)."""
        if self._current is None or self._current.group.id != group.id:
            self._current = None
            self._current = self._compute(group)
        return self._current

    def release(self, group_id: str) -> None:
        """Drop the results of a group after its last test."""
        if self._current is not None and self._current.group.id == group_id:
            self._current = None

    def case_result(self, case: ParityCase) -> CaseResult:
        """The results of one case; a media file that cannot be read fails the case's own tests, naming it."""
        result = self.group_result(self.plan.group_of(case.id)).cases.get(case.id)
        if result is None:  # only when the needs were computed for another selection of tests
            raise RuntimeError(f"{case.id}: not extracted with its group")
        if result.error is not None:
            pytest.fail(f"{case.id}: {result.error}", pytrace=False)
        return result

    def _compute(self, group: PackGroup) -> GroupResult:
        needs = self.needs[group.id]  # set for every group that has a selected test (pytest_collection_modifyitems)
        self.forward_models()
        self.cost.groups += 1
        if group.over_budget:
            self.cost.over_budget.append(f"{group.id} ({group.tokens} tokens)")
        media: dict[str, Media] = {}
        results: dict[str, CaseResult] = {}
        for case in group.cases:
            if case.id in needs.cases:
                try:
                    media[case.id] = self.load_case_media(case)
                except MediaError as err:
                    results[case.id] = CaseResult(case, error=str(err))
        samples = {case.id: self._sample(case, media[case.id]) for case in group.cases if case.id in media}
        fp32_probe = {case_id: self._float32_probe(case_id, media[case_id]) for case_id in needs.probe & set(samples)}
        # Under --companions=sample the pack stands in for the packing forwards alone: it is then a whole forward
        # when a case of the group has its other outputs checked, which come from it.
        pack_whole = needs.from_pack and bool((needs.outputs | needs.reference) & set(samples))
        packed, pack_outputs = self._packed_forward(list(samples.values()), pack_whole) if needs.packed else ({}, {})
        gridded = [samples[case.id] for case in grid_cases(group) if case.id in samples]
        grid_call, grid_forwards = self._grid_call(gridded) if needs.grid_call and gridded else ([], "")
        grid_left_out = {case.id: "codec-style: its tokens' positions are its own, not its grid's"
                         for case in group.cases if needs.grid_call and case.kind not in GRID_KINDS}
        swap_probe = self.plan.companions.get(group.id) if needs.companions else None
        swaps, swap_forwards, label = (self._companion_swaps(swap_probe, samples, packed, pack_whole) if swap_probe
                                       else ([], "", ""))
        # the group's own swap, bit-identical, shows that its pack can stand in for the packing forwards alone
        evidence = (f"no leak in companion swap {label}: bit-identical"
                    if needs.from_pack and swaps and all(swap.passed for swap in swaps) else None)
        packed_vs_hf, packed_vs_alone, packed_ids = [], [], []
        to_batch: dict[str, Sample] = {}  # the cases run in a batch, and their hf features alone
        alone_hf: dict[str, torch.Tensor] = {}
        for case in group.cases:
            if case.id not in samples:
                continue
            sample = samples.pop(case.id)
            self.cost.case_tokens += sample.num_tokens
            whole = case.id in needs.outputs or case.id in needs.reference  # features from whole forwards
            outputs: dict[str, ModelOutputs] = {}
            if whole and evidence is not None and case.id in pack_outputs:
                self.cost.outputs_cases += case.id in needs.outputs
                outputs = {"hf": self._whole_forward("hf", sample), "packing": pack_outputs[case.id]}
                first = {side: outputs[side].features for side in SIDES}
                source = f"in {group.id} ({evidence})"
            elif whole:
                self.cost.outputs_cases += case.id in needs.outputs
                outputs = {side: self._whole_forward(side, sample) for side in SIDES}
                first, source = {side: outputs[side].features for side in SIDES}, "alone"
            elif evidence is not None and case.id in packed:
                first = {"hf": self._forward("hf", sample), "packing": packed[case.id]}
                source = f"in {group.id} ({evidence})"
            else:
                first, source = {side: self._forward(side, sample) for side in SIDES}, "alone"
            result = CaseResult(
                case, comparison=compare_features(first["hf"], first["packing"], name=case.id,
                                                  threshold=self.settings.threshold, bars=self.settings.bars),
                grid=sample.grid, metadata=sample.metadata, packing_source=source,
            )
            self.cost.path_tokens += 2 * sample.num_tokens
            if case.id in needs.paths:
                result.paths = self._input_paths(case, sample, first)
                self.cost.path_tokens += sample.num_tokens
            if case.id in needs.token_order:
                result.token_order = self._token_order(case, sample, first)
            if case.id in fp32_probe:
                result.probe, result.probe_error, result.probe_forwards = fp32_probe[case.id]
            if case.id in needs.outputs:
                result.outputs = compare_outputs(outputs["hf"], outputs["packing"], case.id,
                                                 output_bars(self.settings.threshold, self.settings.dtype))
            if case.id in needs.reference:
                result.reference = self._reference_verdict(sample, first, result.comparison.passed, case.id)
            del outputs
            pack_outputs.pop(case.id, None)
            if case.id in needs.goldens:
                result.metadata["media_sha256"] = (folder_sha256(case.path) if case.kind == "assets"
                                                   else file_sha256(case.path))
                result.reductions = {side: (*reduce_features(first[side]), list(first[side].shape)) for side in SIDES}
            if case.id in packed:
                packed_ids.append(case.id)
                packed_vs_hf.append(compare_features(
                    first["hf"], packed[case.id], name=f"packed/{case.id}", threshold=self.settings.threshold,
                    labels=("hf", "packing"), bars=self.settings.bars,
                ))
                if source == "alone":
                    packed_vs_alone.append(compare_features(
                        first["packing"], packed[case.id], name=f"alone vs packed/{case.id}",
                        threshold=NEIGHBOUR_MIN_COS[self.settings.dtype], labels=("alone", "packed"),
                    ))
            if case.id in needs.determinism:
                self.cost.determinism_cases += 1
                result.determinism, result.determinism_forwards = self._determinism_problems(
                    case, media[case.id], sample, first, rerun=("hf",) if source != "alone" else SIDES, whole=whole)
                if source != "alone":
                    result.determinism_forwards += f"; packing: features {source}, repeatability shown by that swap"
            if case.id in needs.batch:
                to_batch[case.id], alone_hf[case.id] = sample, first["hf"]
            results[case.id] = result
            del sample, first
        for case_id, (comparisons, forwards) in self._batches(to_batch, alone_hf).items():
            results[case_id].batch, results[case_id].batch_forwards = comparisons, forwards
        del to_batch, alone_hf
        left_out = {case.id: results[case.id].error for case in group.cases
                    if case.id in results and results[case.id].error}
        return GroupResult(group, results, packed_vs_hf, packed_vs_alone, left_out, packed_ids, swaps, swap_forwards,
                           grid_call=grid_call, grid_left_out=grid_left_out, grid_forwards=grid_forwards)

    def _float32_probe(self, case_id: str, media: Media) -> tuple[Comparison | None, str | None, str]:
        """The float32 probe (`vitparity.suite.probe`) of a 16-bit run on the case that carries it (the run's
        smallest selected case, `suite.cases.float32_probe_case`): (comparison, error, what ran)."""
        try:
            comparison, ran = run_probe(self._files, self.settings, self.cost, case_id, media)
        except ModelLoadError as err:
            return None, f"the float32 probe could not load the models: {err}", "float32 probe: not run"
        except (RuntimeError, ValueError, TypeError) as err:  # a model that cannot run in float32: the verdict says so
            return None, f"the float32 probe failed: {type(err).__name__}: {err}", "float32 probe: failed"
        return comparison, None, ran

    def _token_order(self, case: ParityCase, sample: Sample, first: dict[str, torch.Tensor]) -> list[Comparison]:
        """A sparse case fed in a fixed shuffled order (tokens with their positions) on every path that takes an
        order (hf sparse visible_indices, hf mosaic with patch_positions, packing), its features put back in order
        and compared with the same model's features in order: neither model masks attention by order."""
        permutation = token_permutation(sample.num_tokens)
        shuffled, restore = permuted(sample, permutation), torch.argsort(permutation)
        runs = (("hf", "context", "sparse", "hf sparse visible_indices"),
                ("hf", "positions", "mosaic", "hf mosaic patch_positions"), ("packing", "context", "packing", "packing"))
        comparisons = []
        for side, path, short, label in runs:
            features = self._forward(side, shuffled, path=path)[restore.to(first[side].device)]
            comparisons.append(compare_features(
                first[side], features, name=f"order~{short}/{case.id}",
                threshold=self.settings.threshold, labels=(f"{label} in order", f"{label} shuffled"),
            ))
        return comparisons

    def _whole_forward(self, side: str, sample: Sample) -> ModelOutputs:
        """One sample alone through one model, whole: its features, last_hidden_state and pooler_output."""
        self.cost.count(side, sample.num_tokens)
        if side == "hf":
            return hf_outputs(self.model("hf").model, sample, temporal_context=self.pair().temporal_context)
        return packing_outputs(self.model("packing").model, [sample])[0]

    def reference_model(self) -> LoadedModel:
        """vitparity's own non-packing class loaded with the hf checkpoint's weights (once); a checkpoint these
        classes cannot load fails each reference test with the same message."""
        if self._reference is None and self._reference_error is None:
            s = self.settings
            self.cost.reference["loads"] += 1
            try:
                self._reference = load_model(self._files.hf, dtype=s.torch_dtype, device=s.device, own_classes=True,
                                             strict_buffers=s.strict_buffers)
            except ModelLoadError as err:
                self._reference_error = (f"vitparity's own classes cannot load the hf checkpoint's weights as the "
                                         f"reference: {err} (a release that changes the architecture on purpose: "
                                         f"{s.labels['no_reference']})")
        if self._reference_error is not None:
            raise ModelLoadError(self._reference_error)
        return self._reference

    def reference_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The reference as a pair for layer traces (a failing reference test only): vitparity's own non-packing
        class on the hf checkpoint's weights (the hf model itself when it runs that class) and its own packing
        class on the same weights by the converter's mapping (built once)."""
        own = self._files.code and self._files.code["hf"].source == OWN_CODE
        reference = self.model("hf").model if own else self.reference_model().model
        if self._reference_packing is None:
            model = OneVisionEncoderPackingModel(convert_config(reference.config))
            model.load_state_dict(hf_to_packing_state_dict(reference.state_dict()))
            self._reference_packing = model.to(device=self.settings.device, dtype=self.settings.torch_dtype).eval()
        return reference, self._reference_packing

    def _reference_verdict(self, sample: Sample, features: dict[str, torch.Tensor], pair_passed: bool,
                           name: str) -> ReferenceVerdict | str:
        """Both models' features against the reference's (or why the reference could not run). When the hf model
        already runs vitparity's own class on the hf weights, it is the reference: its features, no other forward."""
        if self._files.code and self._files.code["hf"].source == OWN_CODE:
            return reference_verdict(features["hf"], features["packing"], features["hf"], pair_passed, name,
                                     self.settings.threshold)
        try:
            reference = self.reference_model().model
        except ModelLoadError as err:
            return str(err)
        self.cost.reference["forwards"] += 1
        self.cost.reference["tokens"] += sample.num_tokens
        expected = extract_hf(reference, sample, temporal_context=self.pair().temporal_context)
        return reference_verdict(features["hf"], features["packing"], expected, pair_passed, name,
                                 self.settings.threshold)

    def converted_weights(self) -> ConvertedWeights:
        """Each packing tensor against the hf tensor it comes from by the converter's mapping, exactly (once)."""
        if self._converted is None:
            hf, packing = self.models()
            self._converted = converted_weights(hf.model, packing.model)
        return self._converted

    def _packed_forward(self, samples: list[Sample], whole: bool) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, ModelOutputs]]:
        """The group's readable cases in one forward of the packing model, split back per case: their features,
        and with `whole` (a whole forward) all their outputs."""
        if not samples:
            return {}, {}
        self.cost.count("packing", sum(sample.num_tokens for sample in samples))
        if whole:
            outputs = packing_outputs(self.model("packing").model, samples)
            return ({sample.name: out.features for sample, out in zip(samples, outputs)},
                    {sample.name: out for sample, out in zip(samples, outputs)})
        features = extract_packing(self.model("packing").model, samples)
        return {sample.name: feature for sample, feature in zip(samples, features)}, {}

    def _companion_swaps(self, probe: Probe, samples: dict[str, Sample], packed: dict[str, torch.Tensor],
                         pack_whole: bool = False) -> tuple[list[SwapResult], str, str]:
        """The planned swap of the group (`suite.cases.companion_probes`): each kept sample's features with the other
        samples' pixels replaced must be bit-identical to those of the pack as given. The group's packed forward is
        the first pass of a whole-group probe; a two-case probe runs its own. Also what was compared, and the swap's
        label (`<group>[<case>+<case>]`)."""
        pack = [samples[case_id] for case_id in probe.cases if case_id in samples]
        if len(pack) < 2:
            return [], "", ""
        model, tokens = self.model("packing").model, sum(sample.num_tokens for sample in pack)
        kept_sets = probe.kept if len(pack) == len(probe.cases) else alternate_halves(len(pack))
        # the swap forwards stop early where the model can: a whole packed forward is reused only where it cannot
        reused = (probe.whole and all(sample.name in packed for sample in pack)
                  and not (pack_whole and stops_early(model)))
        if reused:
            before = [packed[sample.name] for sample in pack]
        else:
            self.cost.count("packing", tokens)
            before = extract_packing(model, pack)
        swaps = []
        for kept in kept_sets:
            self.cost.count("packing", tokens)
            self.cost.companion_swaps += 1
            swaps.extend(companion_swap(model, pack, kept, before=before))
        swaps.sort(key=lambda swap: swap.index)
        label = f"{probe.group}[{'+'.join(sample.name for sample in pack)}]"
        forwards = (f"packing in {label} ({len(pack)} samples, {tokens} tokens) vs the same pack with "
                    f"{'the other half' if len(kept_sets) > 1 else 'the companions'} swapped, "
                    f"{len(kept_sets)} swap forward{'s' if len(kept_sets) > 1 else ''}"
                    + ("; the group's packed forward as first pass" if reused else "; a first pass of its own"))
        return swaps, forwards, label

    def _determinism_problems(self, case: ParityCase, media: Media, sample: Sample, first: dict[str, torch.Tensor],
                              *, rerun: tuple[str, ...], whole: bool = False) -> tuple[list[str], str]:
        """Decode again and compare pixels; run each model of `rerun` again alone on the same pixels and compare bit
        for bit. Returns the problems and the forwards compared.

        A second pass that differs gets a third, and the message says which pass was the odd one. `whole`: the
        first pass was a whole forward (`_whole_forward`), and so are the others.
        """

        def again(side: str) -> torch.Tensor:
            return self._whole_forward(side, sample).features if whole else self._forward(side, sample)

        problems, passes = [], {side: 2 for side in rerun}
        pixels = self.load_case_media(case).frames
        if not np.array_equal(media.frames, pixels):
            problems.append(f"decoding the media twice gave different pixels ({pixel_difference(media.frames, pixels)})")
        for side in rerun:
            second = again(side)
            if not (torch.isfinite(first[side]).all() and torch.isfinite(second).all()):
                problems.append(f"{side} model gives NaN or Inf features (test_parity reports where)")
            elif not torch.equal(first[side], second):
                third = again(side)
                passes[side] = 3
                problems.append(f"{side} model not deterministic: {feature_difference(first[side], second)} between "
                                f"two passes on the same pixels; {odd_pass(first[side], second, third)}")
        forwards = "media decoded twice; " + ", ".join(f"{side} alone x{count}" for side, count in passes.items())
        return problems, forwards

    # goldens and failure reports

    def golden_folder(self, side: str) -> Path:
        """<golden_dir>/<model_type>-<fingerprint>-<dtype>-<frames>of<context>-<align>: the goldens of one model
        under every setting that changes its features, so a golden is only compared with, or replaced by,
        features made the same way. The fingerprint hashes the weight files: done once per side and session.
        """
        if side not in self._golden_folders:
            s = self.settings
            loaded = self.model(side)
            config = loaded.model.config.to_dict()
            fingerprint = model_fingerprint(loaded.path, config)
            context = self.pair().temporal_context or s.num_frames
            self._golden_folders[side] = s.golden_dir / GoldenFolder(
                config["model_type"], fingerprint[:12], s.dtype, s.num_frames, context, s.align
            ).name
        return self._golden_folders[side]

    def golden_data(self, result: CaseResult, side: str, *, updating: bool) -> GoldenData:
        """The golden of one case and side, with its provenance; when updating, a broken pair is refused."""
        refusal = ""
        if updating:
            if not result.passed:
                refusal = "packing vs non-packing parity fails for this case"
            elif any(self.weight_problems().values()):
                refusal = "the loaded weights are not sane (see test_loaded_weights)"
        projection, norms, shape = result.reductions[side]
        s = self.settings
        provenance = self.pair().provenance()
        meta = {
            "case": result.case.id, "side": side, "model_class": self.model(side).class_name, "dtype": s.dtype,
            "device": s.device, "grid_thw": list(result.grid), "media_sha256": result.metadata["media_sha256"],
            "num_frames": s.num_frames, "align": s.align, "versions": library_versions(), "decoder": decoder_record(),
            "model": provenance["models"][side], "normalization": provenance["normalization"],
            "config_warnings": provenance["config_warnings"], "tf32": provenance["tf32"],
            "restored_buffers": provenance["restored_buffers"][side],
            "attention": self.cost.attention,
            "layers": (self._files.hf_config if side == "hf" else self._files.packing_config).get("num_hidden_layers"),
        }
        for key in ("codec_selection", "codec_assets"):  # a changed selection is named apart from a changed model
            if key in result.metadata:
                meta[key] = result.metadata[key]
        return GoldenData.from_reduction(projection, norms, shape, meta, refusal=refusal,
                                         case=f"{side}/{result.case.id}")

    def parity_failure(self, result: CaseResult) -> str:
        """The failure text of a case whose packing and non-packing features differ (in the run's dtype, or in
        the float32 probe, which is then named), with its heat map."""
        comparison = result.comparison
        text = format_report(result.comparisons)
        if result.probe_error:
            text += f"\n{result.probe_error}"
        if result.probe is not None:
            text += (f"\n{result.probe_forwards}: "
                     + ("passes" if result.probe.passed else f"FAILS ({result.probe.reason})"))
        t, h, w = result.grid
        if comparison.token_cos is not None and comparison.token_cos.size == t * h * w:
            path = self.settings.report_dir / f"{comparison.name}-heatmap.png"
            text += f"\nheat map: {write_cosine_heatmap(comparison.token_cos, result.grid, path, title=comparison.name)}"
        return text


def exactly(comparison: Comparison, a: torch.Tensor, b: torch.Tensor) -> Comparison:
    """`comparison` of `a` and `b` (two (N, D) float32 feature tensors) failed unless they are bit for bit equal: a
    check whose two forwards must agree exactly (same inputs, kernels and shapes) is not judged by a threshold."""
    if torch.equal(a, b) or not comparison.passed:
        return comparison
    return replace(comparison, passed=False,
                   reason=f"not bit-identical ({feature_difference(a, b)}); required bit for bit")
