"""The parity suite's pytest plugin: hooks and fixtures only.

Options live in `vitparity.suite.options`, cases and pack groups in `suite.cases`, the plan and xdist scheduling
in `suite.schedule`, the per-process state in `suite.session`, the summary in `suite.reporting`.

Only light modules are imported here: each hook imports the suite's torch-backed modules when it runs, so
`pytest --help` (which skips the suite's set-up) and `pytest --version` never load torch or transformers.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from typing import TYPE_CHECKING

import pytest

from .gpu_pinning import pin_xdist_worker_gpu
from .suite.costs import FORWARDS_PROPERTY, PROPERTY
from .suite.options import OPTIONS, pytest_addoption, raw_value  # noqa: F401 (pytest_addoption: this plugin's hook)

if TYPE_CHECKING:
    from .compare import Comparison
    from .suite.cases import PackGroup, ParityCase
    from .suite.schedule import InapplicableTests
    from .suite.session import CaseResult, GroupResult, ParitySession

# The suite's options (`pytest_addoption`, imported above) exist only where this plugin is loaded: the repository's
# conftest.py, `vitparity gate` or `-p vitparity.pytest_plugin`; never in another project's pytest.
DEVICE_OPTION = next(option for option in OPTIONS if option.name == "device")
SESSION_KEY: pytest.StashKey[ParitySession] = pytest.StashKey()
INAPPLICABLE_KEY: pytest.StashKey[InapplicableTests] = pytest.StashKey()
MARKERS = {
    "image": "an image case",
    "video": "a video case",
    "codec": "a codec-style sparse case: a video's (vitparity.codec) or a codec asset folder's",
    "assets": "a codec asset folder of the release (vitparity.codec_assets)",
    "packed": "a pack group: several cases in one forward of the packing model",
    "golden": "comparison with the committed golden snapshot",
    "gpu": "runs on a CUDA device",
}


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    if config.option.help:  # pytest --help lists the options; the suite is not set up
        return
    from .suite.settings import resolve_settings

    # Before anything initialises CUDA (resolving `auto` asks torch whether CUDA is available).
    pin_xdist_worker_gpu(str(raw_value(config, DEVICE_OPTION).value))
    settings = resolve_settings(config)  # a value the arguments decide is refused before torch loads
    from .numerics import pinned_float32
    from .suite.baseline import BaselineReporter, check_baseline
    from .suite.golden_upkeep import GoldenUpkeep
    from .suite.media_preflight import check_run_media
    from .suite.progress import ProgressReporter
    from .suite.reporting import FailureWithoutFailedTest, ParityReporter
    from .suite.representative import check_representative
    from .suite.schedule import InapplicableTests, build_plan, controller_workers, worker_count
    from .suite.session import ParitySession, preflight

    numerics = ExitStack()  # float32 on CUDA without TF32 for the whole run (recorded in golden provenance)
    numerics.enter_context(pinned_float32(settings.device, settings.torch_dtype))
    config.add_cleanup(numerics.close)
    if settings.regenerate_goldens:
        config.option.update_snapshots = True
    updating = bool(config.option.update_snapshots)
    if updating:  # goldens an update did not replace are kept or deleted by GoldenUpkeep, never by syrupy
        config.option.no_cleanup = True
    dist = getattr(config.option, "dist", "no")
    if dist not in ("no", "load"):
        raise pytest.UsageError(f"--dist={dist}: the suite schedules its pack groups itself; pass only -n")
    if hasattr(config, "workerinput") or dist == "no":
        workers = worker_count()
    else:  # the xdist controller: one worker per execution environment
        workers = controller_workers(config)
    files = preflight(settings)
    session = ParitySession(settings, build_plan(settings, workers, files), files)
    if not hasattr(config, "workerinput"):  # once, before xdist starts the workers that load the models
        check_run_media(session.plan, settings, files)
    session.baseline = check_baseline(settings, files)
    check_representative(session.plan.all_groups, settings.pack_tokens, settings.require_representative,
                         settings.labels["require_representative"], settings.num_frames)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(ParityReporter(session), "vitparity-reporter")
    config.pluginmanager.register(FailureWithoutFailedTest(), "vitparity-failure-notice")
    inapplicable = InapplicableTests(session.plan, settings)
    config.pluginmanager.register(inapplicable, "vitparity-inapplicable")
    config.stash[INAPPLICABLE_KEY] = inapplicable
    if updating and not hasattr(config, "workerinput"):
        config.pluginmanager.register(GoldenUpkeep(session), "vitparity-golden-upkeep")
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(ProgressReporter(session.plan, config), "vitparity-progress")
    if session.baseline is not None and not hasattr(config, "workerinput"):
        config.pluginmanager.register(BaselineReporter(session.baseline, settings), "vitparity-baseline")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under -n: each pack group runs whole, in order, on the worker the plan gives it."""
    from .suite.schedule import PackGroupScheduling

    return PackGroupScheduling(config, config.stash[SESSION_KEY].plan, log)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize over every case or every pack group (never dropped at collection: the ids are the same on every
    worker and shard; other shards' work is deselected after collection)."""
    from .suite.schedule import CASE_PARAM, GROUP_PARAM

    session = metafunc.config.stash[SESSION_KEY]
    extra = [pytest.mark.gpu] if session.settings.device.startswith("cuda") else []
    if CASE_PARAM in metafunc.fixturenames:
        metafunc.parametrize(CASE_PARAM, [
            pytest.param(case, id=case.id, marks=[getattr(pytest.mark, case.kind), *extra]
                         + ([pytest.mark.codec] if case.kind == "assets" else []))
            for case in session.plan.cases
        ])
    if GROUP_PARAM in metafunc.fixturenames:
        metafunc.parametrize(GROUP_PARAM, [
            pytest.param(group, id=group.id, marks=[pytest.mark.packed, *extra]) for group in session.plan.all_groups
        ])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """After -k / -m and syrupy have seen the collection (what the plan does not run has gone before them:
    `InapplicableTests`): keep this shard's groups, order the items group by group, and note what each group's
    selected tests need."""
    from .suite.schedule import group_needs, probed, split_items

    session = config.stash[SESSION_KEY]
    inapplicable = config.stash[INAPPLICABLE_KEY]
    selection = split_items(session.plan, session.settings, items)
    if selection.deselected:
        config.hook.pytest_deselected(items=selection.deselected)
    items[:] = selection.kept
    from_pack = probed(selection.kept, inapplicable.from_pack)
    session.needs = group_needs(session.plan, selection, from_pack)
    session.left_out = inapplicable.reasons


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Release a group's results after its last test."""
    from .suite.schedule import group_id_of

    plan = item.config.stash[SESSION_KEY].plan
    current = group_id_of(plan, item)
    if current is not None and (nextitem is None or group_id_of(plan, nextitem) != current):
        item.config.stash[SESSION_KEY].release(current)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A shard that holds no group (more shards than groups) has nothing to check: it passes."""
    parity = session.config.stash[SESSION_KEY]
    if parity.settings.shard is not None and not parity.plan.groups \
            and session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(scope="session")
def parity(request: pytest.FixtureRequest) -> ParitySession:
    """The process's parity state (settings, plan, models, the current group's results, cost)."""
    return request.config.stash[SESSION_KEY]


@pytest.fixture
def case_result(request: pytest.FixtureRequest, parity: ParitySession, parity_case: ParityCase) -> CaseResult:
    """The current case's comparison, golden reductions and determinism verdict (computed with its group); the
    forwards the test compares are recorded with it (JUnit property `vitparity_forwards`)."""
    result = parity.case_result(parity_case)
    request.node.user_properties.append((FORWARDS_PROPERTY, result.forwards(request.node.originalname)))
    return result


@pytest.fixture
def group_result(request: pytest.FixtureRequest, parity: ParitySession, parity_group: PackGroup) -> GroupResult:
    """The current pack group's packed forward compared with its cases' own forwards, and its companion swap; the
    forwards the test compares are recorded with it (JUnit property `vitparity_forwards`)."""
    result = parity.group_result(parity_group)
    request.node.user_properties.append((FORWARDS_PROPERTY, result.forwards(request.node.originalname)))
    return result


@pytest.fixture
def batched(request: pytest.FixtureRequest, parity: ParitySession, parity_case: ParityCase) -> CaseResult:
    """The current case's result with its hf features alone compared with its row of an hf batch (`CaseResult.batch`,
    computed with its group): requesting this fixture declares the check (`suite.schedule.BATCH_FIXTURE`); the
    forwards it compared are recorded (JUnit property `vitparity_forwards`)."""
    result = parity.case_result(parity_case)
    request.node.user_properties.append((FORWARDS_PROPERTY, result.batch_forwards))
    return result


@pytest.fixture
def grid_call(request: pytest.FixtureRequest, parity: ParitySession, parity_group: PackGroup) -> GroupResult:
    """The current pack group's result with its grid cases called grid_thw only (`GroupResult.grid_call`):
    requesting this fixture declares the check (`suite.schedule.GRID_FIXTURE`); the forwards it compared are
    recorded (JUnit property `vitparity_forwards`)."""
    result = parity.group_result(parity_group)
    request.node.user_properties.append((FORWARDS_PROPERTY, result.grid_forwards))
    return result


@pytest.fixture
def record_comparison(request: pytest.FixtureRequest):
    """Record a comparison for the summary table and JUnit XML (works under xdist)."""

    def record(comparison: Comparison) -> None:
        request.node.user_properties.append((PROPERTY, json.dumps(comparison.row())))

    return record


@pytest.fixture
def record_figure(request: pytest.FixtureRequest):
    """`record_figure(name, value)`: a per-test figure as a property of the test's JUnit testcase, read by
    `vitparity report-junit` and the summary. Written to the test's user properties as the comparison rows are, not
    through pytest's `record_property`, which warns under pytest's default junit_family (xunit2) in every run
    without an ini file (`vitparity gate`, `--pyargs vitparity.parity_tests`)."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))

    return record


@pytest.fixture
def layer_trace(parity: ParitySession, record_figure):
    """`layer_trace(case_result or group_result)`: the per-layer trace of the failing case(s), as text to append to
    the failure (`first divergence: hidden_states[K]` and a table per case); records the figures as JUnit
    properties and writes the layer plot into the report folder. `layer_trace(case_result, odd_one_out=...)`
    traces the odd one(s) out of a failing reference test against the reference instead. Call it only when the
    test fails."""

    from .suite.tracing import trace_against_reference, trace_failure

    def trace(result: CaseResult | GroupResult, odd_one_out: str | None = None) -> str:
        report = (trace_failure(parity, result) if odd_one_out is None
                  else trace_against_reference(parity, result, odd_one_out))
        for name, value in report.properties():
            record_figure(name, value)
        return "\n\n" + report.format()

    return trace


@pytest.fixture
def golden(request: pytest.FixtureRequest, parity: ParitySession, case_result: CaseResult, snapshot):
    """`golden(side)` asserts the current case's features of that side's model against its committed golden.

    Each check records its golden's state (match, regression, missing: `vitparity.suite.golden_state`); a missing
    golden fails with a short message of its own. While goldens are being written (--snapshot-update), a broken pair
    is refused instead of written. With --golden-baseline, the features are also measured against the baseline
    golden (`vitparity.suite.baseline`).
    """
    from .snapshots import golden_extension
    from .suite.baseline import baseline_property
    from .suite.golden_state import record_state
    from .suite.golden_upkeep import FOLDER_PROPERTY, golden_key

    def check(side: str) -> None:
        updating = bool(request.config.option.update_snapshots)
        data = parity.golden_data(case_result, side, updating=updating)
        folder = parity.golden_folder(side)
        request.node.user_properties.append((FOLDER_PROPERTY, json.dumps(str(folder))))
        failures = []
        if parity.baseline is not None and parity.baseline.covers(side):
            row, failure = parity.baseline.measure(data, side, golden_key(request.node.nodeid))
            request.node.user_properties.extend([baseline_property(row)] if row else [])
            failures.extend([failure] if failure else [])
        assertion = snapshot.with_defaults(
            extension_class=golden_extension(folder, force_rewrite=parity.settings.regenerate_goldens)
        )
        matched = assertion == data  # syrupy records the result (and, when updating, queues the write) here
        missing = "" if updating else record_state(request.node, assertion, side, folder, data)
        if missing:
            failures.insert(0, missing)
        elif not matched:
            lines = assertion.get_assert_diff()
            if any(line.startswith("Traceback") for line in lines):  # an error: its message comes first
                lines = lines[:1]
            failures.insert(0, f"{data.case}: golden in {folder}\n" + "\n".join(lines))
        if failures:
            pytest.fail("\n\n".join(failures), pytrace=False)

    return check
