"""The pytest plugin behind the parity suite: options, GPU pinning, session state, fixtures and reporting.

Loaded by the repository's root conftest.py (`pytest_plugins = ["vitparity.pytest_plugin"]`).
Every option is also read from an environment variable and an ini key (command line > environment > ini >
default). Models load once per session (once per worker under xdist); features of a case are extracted once
and shared by every test that uses them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .gpu_pinning import pin_xdist_worker_gpu

# Pin before anything imports CUDA: conftest.py imports this module when the worker starts.
pin_xdist_worker_gpu()

import torch  # noqa: E402

from .builtin import BUILTIN_MEDIA, builtin_paths  # noqa: E402
from .checks import config_differences, loaded_model_problems  # noqa: E402
from .compare import Comparison, compare_features, comparison_from_row  # noqa: E402
from .extract import Sample, extract_hf, extract_packing, prepare_sample  # noqa: E402
from .loading import (  # noqa: E402
    DTYPES, LoadedModel, ModelLoadError, library_versions, load_model, missing_cuda_device, resolve_device_dtype,
)
from .media import ALIGN_POLICIES, Media, MediaError, discover_media, load_media, media_kind  # noqa: E402
from .report import format_table, write_cosine_heatmap  # noqa: E402
from .snapshots import GoldenData, file_sha256, golden_extension, golden_file_stem, model_fingerprint  # noqa: E402

PROPERTY = "vitparity"
LOADS_KEY = "vitparity_model_loads"


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    default: str | None = None
    flag: bool = False

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "VITPARITY_" + self.name.upper()


OPTIONS = (
    Option("hf_model", "non-packing checkpoint folder (default: the built-in tiny model)"),
    Option("packing_model", "packing checkpoint folder (default: the built-in tiny packing model)"),
    Option("device", "cpu, cuda, cuda:N or auto (cuda when available)", "auto"),
    Option("dtype", "float32, bfloat16, float16 or auto (bfloat16 on cuda, float32 on cpu)", "auto"),
    Option("num_frames", "frames sampled per video", "8"),
    Option("media", "extra folder of images and videos: each file becomes a case"),
    Option("align", f"patch alignment of sizes that are not a multiple of the patch size: {ALIGN_POLICIES}", "crop"),
    Option("threshold", "min per-token cosine (strictly greater) for packing vs non-packing parity", "0.99"),
    Option("golden_dir", "root folder of golden snapshots", "fixtures/golden"),
    Option("report_dir", "folder for heat maps of failing cases", "parity-report"),
    Option("trust_remote_code", "allow a checkpoint's own code (auto_map) to run", flag=True),
    Option("regenerate_goldens", "rewrite every selected golden (implies --snapshot-update)", flag=True),
    Option("require_device", "fail instead of skip when the requested CUDA device is absent", flag=True),
)

TRUE = {"1", "true", "yes", "on"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vitparity", "packing vs non-packing parity suite (write paths as --option=PATH)")
    for option in OPTIONS:
        default = f"; default {option.default}" if option.default else ""
        text = f"{option.help} [env {option.env}; ini vitparity_{option.name}{default}]"
        if option.flag:
            group.addoption(option.cli, action="store_const", const=True, default=None, dest=f"vitparity_{option.name}", help=text)
            parser.addini(f"vitparity_{option.name}", option.help, type="bool", default=None)
        else:
            group.addoption(option.cli, default=None, dest=f"vitparity_{option.name}", metavar=option.name.upper(), help=text)
            parser.addini(f"vitparity_{option.name}", option.help, default=None)


@dataclass(frozen=True)
class RawValue:
    """An option's value and where it came from (named in error messages; relative paths resolve by it)."""

    value: str | bool | None
    source: str  # "cli", "env", "ini" or "default"
    label: str  # how the user spelled it: --num-frames, VITPARITY_NUM_FRAMES, ini vitparity_num_frames


def _raw(config: pytest.Config, option: Option) -> RawValue:
    value = config.getoption(f"vitparity_{option.name}")
    if value is not None:
        return RawValue(value, "cli", option.cli)
    value = os.environ.get(option.env)
    if value is not None:
        return RawValue(value.strip().lower() in TRUE if option.flag else value, "env", option.env)
    value = config.getini(f"vitparity_{option.name}")
    if value is not None and value != "":
        return RawValue(bool(value) if option.flag else value, "ini", f"ini vitparity_{option.name}")
    return RawValue(bool(option.default) if option.flag else option.default, "default", option.cli)


@dataclass(frozen=True)
class ParityCase:
    """One media file; its id (`image-astronaut.jpg`) is stable on every machine."""

    id: str
    kind: str
    path: Path


@dataclass(frozen=True)
class Settings:
    hf_model: Path
    packing_model: Path
    device: str
    dtype: str
    num_frames: int
    align: str
    threshold: float
    golden_dir: Path
    report_dir: Path
    trust_remote_code: bool
    regenerate_goldens: bool
    require_device: bool
    cases: tuple[ParityCase, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _resolve_path(config: pytest.Config, raw: RawValue) -> Path:
    """A path option: relative paths from the command line or environment resolve against the current
    folder, those from the ini file or the defaults against the ini file's folder (the repository root)."""
    path = Path(str(raw.value)).expanduser()
    if path.is_absolute():
        return path
    if raw.source in ("cli", "env"):
        return Path(config.invocation_params.dir) / path
    return (config.inipath.parent if config.inipath else config.rootpath) / path


def collect_cases(media_dirs: list[Path]) -> tuple[ParityCase, ...]:
    """Every image and video of the bundled folder and the extra folders, with unique readable ids."""
    cases: dict[str, ParityCase] = {}
    for folder in media_dirs:
        for path in discover_media(folder):
            kind = media_kind(path)
            case = ParityCase(f"{kind}-{path.name}", kind, path)
            stem = golden_file_stem(case.id)
            if stem in cases:
                raise pytest.UsageError(
                    f"two media files would share the case id or golden file {stem}: {cases[stem].path} and {path} "
                    "(rename one)"
                )
            cases[stem] = case
    return tuple(cases.values())


def resolve_settings(config: pytest.Config) -> Settings:
    """Read and validate every option once; errors name the option as it was given (flag, variable or ini key)."""
    raw = {option.name: _raw(config, option) for option in OPTIONS}

    def bad(name: str, problem: str) -> pytest.UsageError:
        return pytest.UsageError(f"{raw[name].label}={raw[name].value}: {problem}")

    def path(name: str) -> Path | None:
        return _resolve_path(config, raw[name]) if raw[name].value else None

    try:
        device, dtype = resolve_device_dtype(raw["device"].value, raw["dtype"].value)
    except ValueError as err:
        raise pytest.UsageError(f"{raw['device'].label} / {raw['dtype'].label}: {err}") from err
    if raw["align"].value not in ALIGN_POLICIES:
        raise bad("align", f"use one of {ALIGN_POLICIES}")
    try:
        num_frames = int(raw["num_frames"].value)
    except ValueError:
        raise bad("num_frames", "not a whole number") from None
    if num_frames < 1:
        raise bad("num_frames", "must be >= 1")
    try:
        threshold = float(raw["threshold"].value)
    except ValueError:
        raise bad("threshold", "not a number") from None
    if not 0.0 < threshold < 1.0:
        raise bad("threshold", "must be in (0, 1)")
    media_dirs = [BUILTIN_MEDIA]
    if raw["media"].value:
        media_dirs.append(path("media"))
    try:
        cases = collect_cases(media_dirs)
    except MediaError as err:
        raise pytest.UsageError(f"{raw['media'].label}: {err}") from err
    hf_model, packing_model = path("hf_model"), path("packing_model")
    if hf_model is None or packing_model is None:
        default_hf, default_packing = builtin_paths()
        hf_model, packing_model = hf_model or default_hf, packing_model or default_packing
    return Settings(
        hf_model=hf_model,
        packing_model=packing_model,
        device=device,
        dtype=dtype,
        num_frames=num_frames,
        align=raw["align"].value,
        threshold=threshold,
        golden_dir=path("golden_dir"),
        report_dir=path("report_dir"),
        trust_remote_code=raw["trust_remote_code"].value,
        regenerate_goldens=raw["regenerate_goldens"].value,
        require_device=raw["require_device"].value,
        cases=cases,
    )


@dataclass
class CaseFeatures:
    """Features of one case from both models (float32 torch tensors (N, D), where the models run) and their comparison.

    They stay on the device: comparisons and golden reductions run there and copy only per-token results.
    The decoded media (uint8 frames, on the host) is kept so that later passes can reuse the same pixels.
    """

    case: ParityCase
    hf: torch.Tensor
    packing: torch.Tensor
    grid: tuple[int, int, int]
    metadata: dict
    comparison: Comparison
    media: Media


@dataclass
class ParitySession:
    """Per-session (per-worker) state: the two models, cached features, and load counts."""

    settings: Settings
    load_counts: dict[str, int] = field(default_factory=lambda: {"hf": 0, "packing": 0})
    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _features: dict[str, CaseFeatures] = field(default_factory=dict)
    _packed: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None
    _model_error: str | None = None
    _media_errors: dict[str, str] = field(default_factory=dict)
    _golden_folders: dict[str, Path] = field(default_factory=dict)
    _weight_problems: dict[str, list[str]] | None = None

    def check_device(self) -> None:
        """Skip (or fail with --require-device) when the requested CUDA device is not there."""
        problem = missing_cuda_device(self.settings.device)
        if problem is None:
            return
        message = f"device {self.settings.device} requested but {problem}"
        if self.settings.require_device:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    def models(self) -> tuple[LoadedModel, LoadedModel]:
        """Both models, loaded once; their configs must agree before any forward pass.

        A pair that cannot be loaded fails every test that needs it with the same clear message (tried once).
        """
        self.check_device()
        if self._model_error is None and not self._models:
            try:
                self._models = self._load_pair()
            except ModelLoadError as err:
                self._model_error = str(err)
        if self._model_error is not None:
            pytest.fail(self._model_error, pytrace=False)
        return self._models["hf"], self._models["packing"]

    def _load_pair(self) -> dict[str, LoadedModel]:
        s = self.settings
        models = {}
        for side, path in (("hf", s.hf_model), ("packing", s.packing_model)):
            loaded = load_model(path, dtype=s.torch_dtype, device=s.device, trust_remote_code=s.trust_remote_code)
            self.load_counts[side] += 1
            if loaded.side != side:
                raise ModelLoadError(f"{path}: given as the {side} model, but it is {loaded.describe()}")
            models[side] = loaded
        diffs = config_differences(models["hf"].model.config, models["packing"].model.config)
        if diffs:
            raise ModelLoadError(
                f"{s.hf_model} and {s.packing_model} do not describe the same architecture: {'; '.join(diffs)}"
            )
        context = models["hf"].model.config.rope_temporal_size
        if context is not None and s.num_frames > context:
            raise ModelLoadError(
                f"--num-frames={s.num_frames} does not fit the temporal context of {s.hf_model} "
                f"(rope_temporal_size={context}): sample at most {context} frames per video"
            )
        return models

    def weight_problems(self) -> dict[str, list[str]]:
        """Side -> problems of its loaded parameters and buffers (`loaded_model_problems`), found once."""
        if self._weight_problems is None:
            hf, packing = self.models()
            self._weight_problems = {"hf": loaded_model_problems(hf.model), "packing": loaded_model_problems(packing.model)}
        return self._weight_problems

    def load_case_media(self, case: ParityCase) -> Media:
        """Decode the case's image or video (frames sampled and aligned to the models' patch size)."""
        s, patch_size = self.settings, self.models()[0].model.config.patch_size
        return load_media(case.path, num_frames=s.num_frames, patch_size=patch_size, align=s.align)

    def _sample(self, case: ParityCase, media: Media) -> Sample:
        s = self.settings
        hf_config = self.models()[0].model.config
        return prepare_sample(
            media, patch_size=hf_config.patch_size, dtype=s.torch_dtype, device=s.device,
            temporal_context=hf_config.rope_temporal_size, name=case.id,
        )

    def extract(self, case: ParityCase, media: Media | None = None) -> CaseFeatures:
        """Both models' penultimate features of one case, each run alone (a fresh forward pass each call).

        `media`: the case's already decoded pixels (from an earlier call); decoded and its file hashed (for the
        golden metadata) when None.
        """
        hf, packing = self.models()
        if media is None:
            media = self.load_case_media(case)
            media.metadata["media_sha256"] = file_sha256(case.path)
        sample = self._sample(case, media)
        a = extract_hf(hf.model, sample, temporal_context=hf.model.config.rope_temporal_size)
        b = extract_packing(packing.model, [sample])[0]
        comparison = compare_features(a, b, name=case.id, threshold=self.settings.threshold)
        return CaseFeatures(case, a, b, sample.grid, sample.metadata, comparison, media)

    def features(self, case: ParityCase) -> CaseFeatures:
        """`extract(case)`, done once per session and shared by every test of the case.

        A media file that cannot be read fails the tests of its own case only, naming the file and the cause.
        """
        if case.id not in self._features and case.id not in self._media_errors:
            try:
                self._features[case.id] = self.extract(case)
            except MediaError as err:
                self._media_errors[case.id] = str(err)
        if case.id in self._media_errors:
            pytest.fail(f"{case.id}: {self._media_errors[case.id]}", pytrace=False)
        return self._features[case.id]

    def packed_features(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Packing-model features of every readable case packed into one forward pass, split back per case.

        Returns (case id -> features, case id -> media error of the cases left out); computed once.
        """
        if self._packed is None:
            packing = self.models()[1]
            samples, errors = [], {}
            for case in self.settings.cases:
                try:
                    known = self._features.get(case.id)
                    samples.append(self._sample(case, known.media if known else self.load_case_media(case)))
                except MediaError as err:
                    errors[case.id] = str(err)
            features = extract_packing(packing.model, samples) if samples else []
            self._packed = ({s.name: f for s, f in zip(samples, features)}, errors)
        return self._packed

    def golden_folder(self, side: str) -> Path:
        """<golden_dir>/<model_type>-<fingerprint>-<dtype>-<frames>of<context>-<align>: the goldens of one model
        under every setting that changes its features (dtype, frames sampled per video, the temporal context
        they are placed in, the patch alignment), so a golden is only compared with, or replaced by, features
        made the same way.

        The fingerprint hashes the weight files (GBs for real checkpoints): done once per side and session.
        """
        if side not in self._golden_folders:
            s = self.settings
            hf, packing = self.models()
            loaded = hf if side == "hf" else packing
            config = loaded.model.config.to_dict()
            fingerprint = model_fingerprint(loaded.path, config)
            context = hf.model.config.rope_temporal_size or s.num_frames
            self._golden_folders[side] = s.golden_dir / (
                f"{config['model_type']}-{fingerprint[:12]}-{s.dtype}-{s.num_frames}of{context}-{s.align}"
            )
        return self._golden_folders[side]


SESSION_KEY = pytest.StashKey[ParitySession]()


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in (
        ("image", "an image case"),
        ("video", "a video case"),
        ("packed", "all cases packed into one forward pass"),
        ("golden", "comparison with the committed golden snapshot"),
        ("gpu", "runs on a CUDA device"),
    ):
        config.addinivalue_line("markers", f"{marker}: {text}")
    settings = resolve_settings(config)
    if settings.regenerate_goldens:
        config.option.update_snapshots = True
    session = ParitySession(settings)
    config.stash[SESSION_KEY] = session
    reporter = ParityReporter(session)
    config.pluginmanager.register(reporter, "vitparity-reporter")
    config.pluginmanager.register(FailureWithoutFailedTest(), "vitparity-failure-notice")
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(XdistLoadCounts(reporter), "vitparity-xdist-loads")


def parity_session(config: pytest.Config) -> ParitySession:
    return config.stash[SESSION_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `parity_case` over every case (never dropped at collection: skips happen at run time)."""
    if "parity_case" not in metafunc.fixturenames:
        return
    settings = parity_session(metafunc.config).settings
    extra = [pytest.mark.gpu] if settings.device.startswith("cuda") else []
    params = [pytest.param(c, id=c.id, marks=[getattr(pytest.mark, c.kind), *extra]) for c in settings.cases]
    metafunc.parametrize("parity_case", params)


@pytest.fixture(scope="session")
def parity(request: pytest.FixtureRequest) -> ParitySession:
    """The session's parity state (settings, models, cached features)."""
    return parity_session(request.config)


@pytest.fixture
def case_features(parity: ParitySession, parity_case: ParityCase) -> CaseFeatures:
    """Both models' features of the current case (extracted once per session)."""
    return parity.features(parity_case)


@pytest.fixture
def record_comparison(request: pytest.FixtureRequest):
    """Record a comparison for the summary table and JUnit XML (works under xdist)."""

    def record(comparison: Comparison) -> None:
        request.node.user_properties.append((PROPERTY, json.dumps(comparison.row())))

    return record


def heatmap_for(parity: ParitySession, comparison: Comparison, grid: tuple[int, int, int]) -> Path | None:
    """Write the per-token cosine heat map of a failing comparison; None when there is nothing to draw."""
    if comparison.token_cos is None or comparison.token_cos.size != grid[0] * grid[1] * grid[2]:
        return None
    path = parity.settings.report_dir / f"{comparison.name}.png"
    return write_cosine_heatmap(comparison.token_cos, grid, path, title=comparison.name)


@pytest.fixture
def golden(request: pytest.FixtureRequest, parity: ParitySession, snapshot):
    """`golden(side, data)` asserts GoldenData against the committed golden of that side's model."""

    def check(side: str, data: GoldenData) -> None:
        folder = parity.golden_folder(side)
        assertion = snapshot.with_defaults(
            extension_class=golden_extension(folder, force_rewrite=parity.settings.regenerate_goldens)
        )
        if not assertion == data:  # syrupy records the result (and, when updating, queues the write) here
            lines = assertion.get_assert_diff()
            if any(line.startswith("Traceback") for line in lines):  # an error: its message comes first
                lines = lines[:1]
            pytest.fail(f"{data.case}: golden in {folder}\n" + "\n".join(lines), pytrace=False)

    return check


def golden_meta(parity: ParitySession, features: CaseFeatures, side: str) -> dict:
    """Provenance stored in a golden."""
    loaded = parity.models()[0 if side == "hf" else 1]
    return {
        "case": features.case.id,
        "side": side,
        "model_class": loaded.class_name,
        "dtype": parity.settings.dtype,
        "device": parity.settings.device,
        "grid_thw": list(features.grid),
        "media_sha256": features.metadata["media_sha256"],
        "num_frames": parity.settings.num_frames,
        "align": parity.settings.align,
        "versions": library_versions(),
    }


class ParityReporter:
    """Collects recorded comparisons (from this process or from xdist workers) and prints the summary table."""

    def __init__(self, session: ParitySession) -> None:
        self.session = session
        self.rows: list[dict] = []
        self.loads: dict[str, dict[str, int]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.rows.extend(json.loads(value) for name, value in report.user_properties if name == PROPERTY)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Model load counts of this process: sent to the controller by an xdist worker, kept otherwise."""
        counts = dict(self.session.load_counts)
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[LOADS_KEY] = json.dumps(counts)
        elif any(counts.values()):
            self.loads["main"] = counts

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        s = self.session.settings
        terminalreporter.write_sep("=", "vitparity parity summary")
        terminalreporter.write_line(
            f"hf: {s.hf_model}  packing: {s.packing_model}  device: {s.device}  dtype: {s.dtype}  "
            f"threshold: min cos > {s.threshold}  (figures: float32 comparisons)"
        )
        for worker, counts in sorted(self.loads.items()):
            terminalreporter.write_line(f"model loads ({worker}): hf {counts['hf']}, packing {counts['packing']}")
        terminalreporter.write_line(format_table([comparison_from_row(r) for r in self.rows]))
        failed = sum(not r["passed"] for r in self.rows)
        terminalreporter.write_line(f"{len(self.rows)} comparisons, {len(self.rows) - failed} passed, {failed} failed")


class FailureWithoutFailedTest:
    """Says why a run failed when no test did (syrupy fails a full run on unused goldens, after every test)."""

    exitstatus: int = 0

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.exitstatus = session.exitstatus  # after syrupy's own sessionfinish has set it

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.exitstatus == pytest.ExitCode.TESTS_FAILED and not terminalreporter.stats.get("failed") \
                and not terminalreporter.stats.get("error"):
            terminalreporter.write_sep(
                "=", "FAILED although no test failed: unused goldens (orphans; -v lists them) fail a full run; "
                "delete them on purpose with --snapshot-update", red=True,
            )


class XdistLoadCounts:
    """Controller side under xdist: collects each worker's model load counts as it shuts down."""

    def __init__(self, reporter: ParityReporter) -> None:
        self.reporter = reporter

    def pytest_testnodedown(self, node, error) -> None:
        counts = json.loads(getattr(node, "workeroutput", {}).get(LOADS_KEY, "{}"))
        if any(counts.values()):
            self.reporter.loads[node.gateway.id] = counts
