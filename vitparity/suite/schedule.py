"""The run's plan (cases, pack groups, this shard's share, each worker's groups, the sampled checks) and how test
items follow it: grouped in order, a whole group on one xdist worker, other shards' groups deselected. What a group
computes depends on the group and the run's selection of tests alone, never on the worker or shard that runs it."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import pytest

from ..media import MediaError
from .cases import (
    CaseError, PackGroup, ParityCase, Probe, batch_cases, by_size, collect_cases, companion_probes,
    determinism_cases, float32_probe_case, make_groups, plan_workers, resolve_policy, token_order_cases,
)
from ..models import OneVisionEncoderConfig
from ..checkpoint_code import CHECKPOINT_CODE
from ..pair import PairFiles
from .settings import Settings

if TYPE_CHECKING:
    from xdist.workermanage import WorkerController

CASE_PARAM = "parity_case"
GROUP_PARAM = "parity_group"
_PARAM_ID = re.compile(r"\[(.*)\]$")


def _escaped(case_id: str) -> str:
    """A case id as pytest writes it in node ids: non-ASCII characters as backslash escapes."""
    return case_id.encode("unicode_escape").decode("ascii")


@dataclass(frozen=True)
class Plan:
    """Every case and pack group of the run, this shard's groups, which worker runs each of them, and the checks
    the policies add to this shard's groups: determinism re-runs, companion swaps, token order, outputs, reference
    (each chosen per pack group or once for the run, `vitparity.suite.cases`: the same whatever the workers and
    shards), and whether a 16-bit run has a float32 probe."""

    cases: tuple[ParityCase, ...]
    all_groups: tuple[PackGroup, ...]
    groups: tuple[PackGroup, ...]  # this shard's
    owner: dict[str, int]  # group id -> worker index
    determinism: frozenset[str]  # case ids re-run to check determinism
    companions: dict[str, Probe] = field(default_factory=dict)  # group id -> its companion swap
    companion_policy: str = "all"  # resolved: all, sample or off
    token_order: frozenset[str] = frozenset()  # case ids fed in a shuffled token order
    outputs: frozenset[str] = frozenset()  # case ids whose last_hidden_state and pooler_output are compared
    reference: frozenset[str] = frozenset()  # case ids compared with vitparity's own classes (when one runs)
    reference_off: str = ""  # why no reference runs ("" when it does)
    float32_probe: bool = False  # a 16-bit run's float32 probe runs (on the case `float32_probe_case` picks)
    batch: frozenset[str] = frozenset()  # case ids whose hf features are also taken from a batch (`batch_cases`)

    def group_of(self, case_id: str) -> PackGroup:
        return self._groups_by_id[self._case_group[case_id]]

    @cached_property
    def _groups_by_id(self) -> dict[str, PackGroup]:
        return {group.id: group for group in self.all_groups}

    def scope_of(self, nodeid: str) -> str:
        """The pack group a test belongs to, read from its id (the xdist controller sees only ids)."""
        match = _PARAM_ID.search(nodeid)
        if match:
            param = match.group(1)
            if param in self._group_ids:
                return param
            for case_id in self._case_ids_longest_first:
                if param == case_id or param.startswith(case_id + "-"):
                    return self._escaped_case_group[case_id]
        return nodeid

    @cached_property
    def _group_ids(self) -> set[str]:
        return {group.id for group in self.all_groups}

    @cached_property
    def _case_ids_longest_first(self) -> list[str]:
        return sorted(self._escaped_case_group, key=len, reverse=True)

    @cached_property
    def _case_group(self) -> dict[str, str]:
        return {case.id: group.id for group in self.all_groups for case in group.cases}

    @cached_property
    def _escaped_case_group(self) -> dict[str, str]:
        """Case ids as they appear in node ids (pytest writes non-ASCII characters of ids as escapes) -> group."""
        return {_escaped(case_id): group_id for case_id, group_id in self._case_group.items()}


@dataclass
class GroupNeeds:
    """What the selected tests of one group need: cases to extract, determinism re-runs, goldens, the pack."""

    cases: set[str] = field(default_factory=set)
    determinism: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)  # last_hidden_state and pooler_output compared
    reference: set[str] = field(default_factory=set)  # features compared with vitparity's own classes
    goldens: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)  # cases whose hf explicit-positions call runs (test_input_paths)
    token_order: set[str] = field(default_factory=set)  # cases fed in a shuffled order (test_token_order)
    packed: bool = False
    companions: bool = False  # test_companions_do_not_leak is selected: the group's planned swap runs
    from_pack: bool = False  # the cases' packing features come from the pack once its swap has shown no leak
    probe: set[str] = field(default_factory=set)  # the case that carries the run's float32 probe (at most one)
    batch: set[str] = field(default_factory=set)  # cases run through the hf model in a batch (BATCH_FIXTURE)
    grid_call: bool = False  # the group's pack is called grid_thw only and with its grid's positions (GRID_FIXTURE)


@dataclass
class Selection:
    """The items kept (in run order) and deselected (other shards' share, or -k / -m: pytest's own)."""

    kept: list[pytest.Item]
    deselected: list[pytest.Item]


def controller_workers(config: pytest.Config) -> int:
    """Workers the xdist controller starts: one per execution environment of its `--tx` option (`-n N` is N times
    `popen`; a spec may be written `N*popen`)."""
    total = 0
    for spec in config.getoption("tx", None) or []:
        count, star, _ = str(spec).partition("*")
        total += int(count) if star and count.isdigit() else 1
    return max(total, 1)


def worker_count() -> int:
    """Workers of this xdist run as a worker sees it (1 outside xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def build_plan(settings: Settings, workers: int, files: PairFiles | None) -> Plan:
    """Cases from the media folders, their groups, this shard's share, its split over `workers` and the checks
    sampled in it (by the cases alone: `workers` decides only which worker runs a group).

    `files`: the pair's config files (None when they cannot be read: every test fails on it, the plan only needs
    a patch size to estimate tokens).
    """
    patch_size = files.patch_size if files is not None else OneVisionEncoderConfig().patch_size
    try:
        cases = collect_cases(
            list(settings.media_dirs), patch_size=patch_size, align=settings.align,
            num_frames=settings.num_frames, scales=settings.scales, codec_frames=settings.codec_frames,
        )
    except (MediaError, CaseError) as err:
        raise pytest.UsageError(f"{settings.labels['media']}: {err}") from err
    groups = make_groups(cases, settings.pack_tokens)
    mine = groups if settings.shard is None else settings.shard.groups(groups)
    in_shard = {case.id for group in mine for case in group.cases}
    return Plan(cases, groups, mine, plan_workers(mine, workers),
                frozenset(determinism_cases(settings.determinism, settings.device, mine)),
                companion_probes(settings.companions, settings.device, mine),
                resolve_policy(settings.companions, settings.device), frozenset(token_order_cases(groups) & in_shard),
                frozenset(determinism_cases(settings.outputs, settings.device, mine)),  # the same sampling rule
                frozenset(reference_cases(settings.outputs, settings.device, mine)),
                reference_off(settings, files), settings.probes,
                frozenset(batch_cases(settings.determinism, settings.device, groups) & in_shard))


def item_scope(item: pytest.Item) -> tuple[ParityCase | None, PackGroup | None]:
    """The case and the group of a test item (None for tests outside any case)."""
    params = getattr(item, "callspec", None)
    params = params.params if params is not None else {}
    return params.get(CASE_PARAM), params.get(GROUP_PARAM)


COMPANION_TEST = "test_companions_do_not_leak"
# Checks declared by the fixture their test requests (parity_tests/test_paths.py): the case's hf features in a batch,
# and the pack's packing features called with grid_thw only.
BATCH_FIXTURE = "batched"
GRID_FIXTURE = "grid_call"
GRID_KINDS = ("image", "video")  # the kinds whose token positions are their grid's


def reference_cases(policy: str, device: str, groups: tuple[PackGroup, ...]) -> set[str]:
    """Case ids whose features are compared with the reference (one more forward each): `all` (the CPU's `auto`)
    every case; `off` none; `sample` (a GPU's `auto`) the smallest case of each pack group, cheap (a fault shared
    by both release files does not depend on the input's size) and the same whatever the workers and shards."""
    policy = resolve_policy(policy, device)
    if policy in ("all", "off"):
        return {case.id for group in groups for case in group.cases} if policy == "all" else set()
    return {min(group.cases, key=by_size).id for group in groups}


class InapplicableTests:
    """Leaves out the tests the plan does not run, before any other plugin sees the collection: the reference tests
    when no reference runs (`Plan.reference_off`) and what the policies leave out (`leave_out`). Not deselected:
    they do not apply to the run, and a deselection would make a full run look narrowed (syrupy then no longer
    judges unused goldens). The summary and the JUnit XML say what was left out and why (`reasons`)."""

    def __init__(self, plan: Plan, settings: Settings) -> None:
        self.plan = plan
        self.settings = settings
        self.reasons: dict[str, list[str]] = {}  # why: test names
        self.from_pack: set[str] = set()  # groups whose cases take their packing features from their pack

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        if self.plan.reference_off:
            items[:] = [item for item in items if getattr(item, "originalname", "") != "test_reference"]
        items[:], self.reasons, self.from_pack = leave_out(self.plan, self.settings, items)


def reference_off(settings: Settings, files: PairFiles | None) -> str:
    """Why vitparity's own classes are not run as a reference ("" when they are): --no-reference, or no checkpoint
    code runs (the reference would compare vitparity's classes with themselves)."""
    if not settings.reference:
        return f"{settings.labels['no_reference']}: the reference is switched off"
    if files is None or not any(code.source == CHECKPOINT_CODE for code in (files.code or {}).values()):
        return "no checkpoint code runs: vitparity's own classes would be their own reference"
    return ""
ALONE_VS_PACKED_TEST = "test_packing_independent_of_neighbours"
PARITY_TEST = "test_parity"
INPUT_PATHS_TEST = "test_input_paths"
TOKEN_ORDER_TEST = "test_token_order"


def leave_out(plan: Plan, settings: Settings,
              items: list[pytest.Item]) -> tuple[list[pytest.Item], dict[str, list[str]], set[str]]:
    """The items the policies run (in collection order), why the others do not run (reason -> test names), and the
    groups whose cases take their packing features from their pack.

    Under --companions=sample, a group with a probe swap takes its cases' packing features from its pack (no forward
    alone): its alone-vs-packed comparison has nothing to compare and is left out. The rule is the plan's alone, so
    that it is the same on every worker and shard, whatever -k / -m keep.
    """
    kept, reasons = [], {}
    from_pack = set(plan.companions) if plan.companion_policy == "sample" else set()

    def reason_for(item: pytest.Item) -> str | None:
        case, group = item_scope(item)
        name = getattr(item, "originalname", "")
        if case is not None:
            if name == "test_deterministic" and case.id not in plan.determinism:
                return f"--determinism={settings.determinism}: case not re-run"
            if name == INPUT_PATHS_TEST and case.kind == "image":
                return "images: the hf model takes an image one way here (explicit positions are checked on videos)"
            if name == INPUT_PATHS_TEST and case.kind == "assets":
                return "codec asset folders: the hf model takes mosaics one way (explicit positions), in test_parity"
            if name == TOKEN_ORDER_TEST and case.id not in plan.token_order:
                return "token order: one codec-style case of the run (the smallest) is fed shuffled"
            if name == "test_outputs" and case.id not in plan.outputs:
                return f"--outputs={settings.outputs}: case's last_hidden_state and pooler_output not compared"
            if name == "test_reference" and case.id not in plan.reference:
                return f"--outputs={settings.outputs}: case not compared with the reference"
            if BATCH_FIXTURE in item.fixturenames and case.id not in plan.batch:
                return (f"--determinism={settings.determinism}: case not run in a batch (the run's smallest image "
                        "and video are)")
        if group is not None:
            if name == COMPANION_TEST and group.id not in plan.companions:
                return f"--companions={settings.companions}: no swap planned for this group"
            if GRID_FIXTURE in item.fixturenames and not grid_cases(group):
                return "codec-style cases only: a sparse sample's positions have no grid meaning"
            if name == ALONE_VS_PACKED_TEST and group.id in from_pack:
                return ("--companions=sample: packing features come from the pack (no forward alone), neighbour "
                        "independence is the probe's bit-exact swap")
        return None

    mine = {group.id for group in plan.groups}
    for item in items:
        reason = reason_for(item)
        if reason is None:
            kept.append(item)
        elif group_id_of(plan, item) in mine:  # the summary speaks of this shard's tests only
            reasons.setdefault(reason, []).append(item.name)
    return kept, reasons, from_pack


def split_items(plan: Plan, settings: Settings, items: list[pytest.Item]) -> Selection:
    """Keep this shard's items, in order (group by group, a group's case tests, then its packed tests); deselect
    the rest."""
    mine = {group.id for group in plan.groups}
    rank = {group.id: index for index, group in enumerate(plan.groups)}
    kept, deselected = [], []
    for item in items:
        group_id = group_id_of(plan, item)
        in_shard = settings.shard is None or settings.shard.holds(item.nodeid)
        (kept if (group_id in mine if group_id is not None else in_shard) else deselected).append(item)

    def order(item: pytest.Item) -> tuple[int, int]:
        """Tests outside any case first; then group by group, a group's case tests before its packed tests."""
        group_id = group_id_of(plan, item)
        if group_id is None:
            return 0, 0
        return rank[group_id] + 1, int(item_scope(item)[1] is not None)

    return Selection(sorted(kept, key=order), deselected)  # stable: collection order stays


def probed(kept: list[pytest.Item], from_pack: set[str]) -> set[str]:
    """The groups of `from_pack` whose own probe swap is among the kept tests: a -k / -m that leaves a group's probe
    out leaves nothing to show that its pack can stand in for a forward alone, and its cases run alone."""
    probing = {item_scope(item)[1].id for item in kept if item.originalname == COMPANION_TEST}
    return from_pack & probing


def group_id_of(plan: Plan, item: pytest.Item) -> str | None:
    """The pack group a test item belongs to (None for tests outside any case)."""
    case, group = item_scope(item)
    return group.id if group else plan.group_of(case.id).id if case else None


def group_needs(plan: Plan, selection: Selection, from_pack: set[str]) -> dict[str, GroupNeeds]:
    """Group id -> what the selected items need of it (a group whose tests are all deselected needs nothing).

    The float32 probe of a 16-bit run goes with the case `float32_probe_case` picks from the run's selected
    `test_parity` cases, this shard's and the others' (`selection.deselected`), so exactly one process runs it."""
    parity = [item_scope(item)[0] for item in (*selection.kept, *selection.deselected)
              if getattr(item, "originalname", "") == PARITY_TEST]
    probe_case = float32_probe_case(parity) if plan.float32_probe else None
    needs: dict[str, GroupNeeds] = {}
    for item in selection.kept:
        case, group = item_scope(item)
        if case is None and group is None:
            continue
        group_id = group_id_of(plan, item)
        need = needs.setdefault(group_id, GroupNeeds(from_pack=group_id in from_pack))
        if group is not None:
            if item.originalname == COMPANION_TEST:  # a whole-group probe's first pass is the packed forward
                need.packed |= plan.companions[group.id].whole
            else:  # the grid call runs packs of its own
                need.packed |= GRID_FIXTURE not in item.fixturenames
            need.cases.update(c.id for c in group.cases)
            need.companions |= item.originalname == COMPANION_TEST
            need.grid_call |= GRID_FIXTURE in item.fixturenames
        else:
            need.packed |= need.from_pack
            need.cases.add(case.id)
            if item.originalname == "test_deterministic":
                need.determinism.add(case.id)
            if item.originalname == INPUT_PATHS_TEST:
                need.paths.add(case.id)
            if item.originalname == TOKEN_ORDER_TEST:
                need.token_order.add(case.id)
            if item.originalname == "test_outputs":
                need.outputs.add(case.id)
            if item.originalname == "test_reference":
                need.reference.add(case.id)
            if BATCH_FIXTURE in item.fixturenames:
                need.batch.add(case.id)
            if item.originalname == PARITY_TEST and case.id == probe_case:
                need.probe.add(case.id)
            if item.get_closest_marker("golden"):
                need.goldens.add(case.id)
    return needs


def grid_cases(group: PackGroup) -> list[ParityCase]:
    """The cases of `group` the packing model's grid_thw-only call is checked on, in the group's order: every image
    and video (GRID_KINDS). Codec-style cases (a video's sparse selection, an asset folder's mosaics) are left out:
    their tokens' positions are their own, not their grid's."""
    return [case for case in group.cases if case.kind in GRID_KINDS]


def worker_index(node: WorkerController) -> int:
    """A worker's index from its xdist id (`gw3` -> 3; 0 for any other id)."""
    name = node.gateway.id
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0


class PackGroupScheduling:
    """xdist scheduling by pack group: each group's tests go, whole and in order, to the worker the plan names.

    A scheduler of xdist's public protocol (`xdist.scheduler.protocol.Scheduling`, returned by the
    `pytest_xdist_make_scheduler` hook); it talks to workers only through `send_runtest_some`. A worker is kept two
    tests ahead, as xdist's own schedulers do (a worker runs a test once the next one is known). A group whose
    worker is gone (crashed or never started) goes to any worker that asks for work; a crashed worker's unfinished
    groups go back to the queue, less the test it crashed in.
    """

    def __init__(self, config: pytest.Config, plan: Plan, log: object = None) -> None:
        self.plan = plan
        self.expected = controller_workers(config)
        self.pending: dict[WorkerController, list[int]] = {}  # node -> indices sent and not yet complete
        self.collections: dict[WorkerController, list[str]] = {}
        self.collection: list[str] | None = None  # every worker's collection (set once all have collected)
        self.queue: dict[str, list[int]] = {}  # group id -> its test indices, in run order; groups not yet sent

    @property
    def nodes(self) -> list[WorkerController]:
        return list(self.pending)

    @property
    def collection_is_completed(self) -> bool:
        return len(self.collections) >= self.expected

    @property
    def tests_finished(self) -> bool:
        """Every group sent and every worker at its last test (which it runs when shut down)."""
        return (self.collection is not None and not self.queue
                and all(len(indices) < 2 for indices in self.pending.values()))

    @property
    def has_pending(self) -> bool:
        return bool(self.queue) or any(self.pending.values())

    def add_node(self, node: WorkerController) -> None:
        self.pending[node] = []

    def add_node_collection(self, node: WorkerController, collection: Sequence[str]) -> None:
        reference = self.collection or next(iter(self.collections.values()), None)
        if reference is not None and list(collection) != reference:
            differ = sorted(set(collection) ^ set(reference))[:5]
            raise RuntimeError(f"xdist worker {node.gateway.id} collected other tests than the first worker (every "
                               f"worker must collect the same; first differences: {differ})")
        self.collections[node] = list(collection)

    def mark_test_complete(self, node: WorkerController, item_index: int, duration: float = 0) -> None:
        self.pending[node].remove(item_index)
        self._feed(node)

    def mark_test_pending(self, item: str) -> None:
        raise NotImplementedError("the pack-group scheduler does not take tests back")

    def remove_pending_tests_from_node(self, node: WorkerController, indices: Sequence[int]) -> None:
        raise NotImplementedError("the pack-group scheduler does not take tests back")

    def remove_node(self, node: WorkerController) -> str | None:
        """Forget a worker that finished or crashed; returns the test it crashed in (None when it had none left)."""
        pending = self.pending.pop(node)
        self.collections.pop(node, None)
        if not pending or self.collection is None:
            return None
        back: dict[str, list[int]] = {}
        for index in pending[1:]:
            back.setdefault(self.plan.scope_of(self.collection[index]), []).append(index)
        self.queue = {**back, **self.queue}
        for other in self.pending:
            self._feed(other)
        return self.collection[pending[0]]

    def schedule(self) -> None:
        """Once every worker has collected: queue the groups in collection order and feed every worker."""
        assert self.collection_is_completed
        if self.collection is None:
            self.collection = next(iter(self.collections.values()))
            for index, nodeid in enumerate(self.collection):
                self.queue.setdefault(self.plan.scope_of(nodeid), []).append(index)
        for node in self.pending:
            self._feed(node)

    def _feed(self, node: WorkerController) -> None:
        """Send `node` its next groups until it holds two tests or more: its own by the plan, or one whose worker
        is gone."""
        if self.collection is None or getattr(node, "shutting_down", False):
            return
        live = {worker_index(other) for other in self.pending}
        index = worker_index(node)
        while len(self.pending[node]) < 2:
            scope = next((scope for scope in self.queue
                          if self.plan.owner.get(scope) in (None, index) or self.plan.owner[scope] not in live), None)
            if scope is None:
                return
            indices = self.queue.pop(scope)
            self.pending[node].extend(indices)
            node.send_runtest_some(indices)
