"""Release-to-release drift: this run's features, case by case, against the goldens of a previous release.

`--golden-baseline=DIR` names one golden folder (`<model_type>-<fingerprint>-<dtype>-<F>of<C>-<align>`, e.g. the
last release's `fixtures/golden/onevision_encoder-<fp>-bfloat16-8of64-crop`). The model of this pair with that
model type has each case's golden reduction compared with the baseline golden of the same case
(`vitparity.snapshots.reduction_drift`: projected cosine and relative norm difference per token, float32). The
figures go to the summary (a table of their own) and to JUnit (user property `vitparity_baseline`, one JSON row
per golden test). `--baseline-min-cos=X` fails a case whose minimum projected cosine is not above X; without it
the drift is only reported.

A folder of another model type, dtype, frame protocol or alignment is a usage error naming the mismatch: its
features were made another way and drift against it would mean nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from ..pair import PairFiles
from ..snapshots import GoldenCorrupt, GoldenData, GoldenFolder, load_golden, reduction_drift
from .settings import Settings

PROPERTY = "vitparity_baseline"  # user property of a golden test: its BaselineRow (JSON)


@dataclass(frozen=True)
class BaselineRow:
    """One case and side against its baseline golden; figures None when they cannot be computed (see `problem`)."""

    case: str
    side: str
    tokens: int
    min_cos: float | None = None
    mean_cos: float | None = None
    max_norm_rel: float | None = None
    mean_norm_rel: float | None = None
    problem: str = ""  # no baseline golden, token counts differ
    passed: bool = True

    def verdict(self, min_cos: float | None) -> str:
        if self.problem:
            return self.problem
        if min_cos is None:
            return "report only"
        return f"{'PASS' if self.passed else 'FAIL'} (min cos > {min_cos})"


@dataclass(frozen=True)
class Baseline:
    """The baseline golden folder, what its name says, and the failure limit (None: report only)."""

    folder: Path
    parsed: GoldenFolder
    min_cos: float | None

    def covers(self, golden_folder: Path) -> bool:
        """Whether this run's golden folder of one side holds a model of the baseline's model type."""
        parsed = GoldenFolder.parse(Path(golden_folder).name)
        return parsed is not None and parsed.model_type == self.parsed.model_type

    def measure(self, data: GoldenData, side: str, golden_path: tuple[str, str]) -> tuple[BaselineRow | None, str]:
        """(row, failure text or ""): `compare`, with a baseline golden that cannot be read, or a cosine not above
        --baseline-min-cos, as failure text."""
        try:
            row = self.compare(data, side, golden_path)
        except GoldenCorrupt as err:
            return None, f"{side}/{data.meta.get('case', '')}: {err}"
        if row.passed:
            return row, ""
        return row, (f"{side}/{row.case}: min projected cosine {row.min_cos:.6f} against the baseline golden in "
                     f"{self.folder} is not above --baseline-min-cos={self.min_cos} (mean {row.mean_cos:.6f}, max "
                     f"norm drift {row.max_norm_rel:.3e}; float32 figures)")

    def compare(self, data: GoldenData, side: str, golden_path: tuple[str, str]) -> BaselineRow:
        """`data` (one case and side of this run) against the baseline golden at <folder>/<module>/<stem>.npz.

        GoldenCorrupt naming the file when the baseline golden cannot be read."""
        path = self.folder / golden_path[0] / f"{golden_path[1]}.npz"
        case, tokens = data.meta.get("case", ""), len(data.norms)
        if not path.is_file():
            return BaselineRow(case, side, tokens, problem=f"no baseline golden {path.name}")
        try:
            projection, norms, _ = load_golden(path.read_bytes())
        except GoldenCorrupt as err:
            raise GoldenCorrupt(f"baseline golden {path}: {err}") from None
        if projection.shape != data.projection.shape or not tokens:
            return BaselineRow(case, side, tokens, problem=f"tokens differ: baseline {len(norms)}, this run {tokens}")
        d = reduction_drift(data.projection, data.norms, projection, norms)
        passed = self.min_cos is None or d.min_cos > self.min_cos
        return BaselineRow(case, side, tokens, d.min_cos, d.mean_cos, d.max_norm_rel, d.mean_norm_rel, passed=passed)


def check_baseline(settings: Settings, files: PairFiles | None) -> Baseline | None:
    """The `--golden-baseline` folder checked against this run's pair and settings (None when not given).

    pytest.UsageError naming the mismatch: not a golden folder, another model type, dtype, frame protocol or
    alignment."""
    folder = settings.golden_baseline
    if folder is None:
        return None
    where = f"--golden-baseline={folder}"
    if not folder.is_dir():
        raise pytest.UsageError(f"{where}: no such folder")
    parsed = GoldenFolder.parse(folder.name)
    if parsed is None:
        raise pytest.UsageError(f"{where}: not a golden folder (its name must read "
                                "<model_type>-<fingerprint>-<dtype>-<F>of<C>-<align>, e.g. a folder under fixtures/golden)")
    if files is not None:
        types = (files.hf_config.get("model_type"), files.packing_config.get("model_type"))
        if parsed.model_type not in types:
            raise pytest.UsageError(f"{where}: model type {parsed.model_type}, this pair's models are "
                                    f"{types[0]} and {types[1]}")
        context = files.temporal_context or settings.num_frames
    else:
        context = parsed.context  # the checkpoints cannot be read: every test fails on that already
    protocol = f"{settings.num_frames}of{context}"
    for name, theirs, ours in (("dtype", parsed.dtype, settings.dtype),
                               ("frame protocol", f"{parsed.num_frames}of{parsed.context}", protocol),
                               ("align", parsed.align, settings.align)):
        if theirs != ours:
            raise pytest.UsageError(f"{where}: {name} {theirs}, this run {ours}")
    return Baseline(folder, parsed, settings.baseline_min_cos)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


class BaselineReporter:
    """Collects the baseline rows (here or from the xdist workers) and prints them after the parity summary."""

    def __init__(self, baseline: Baseline, settings: Settings) -> None:
        self.baseline, self.settings = baseline, settings
        self.rows: list[BaselineRow] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.rows.extend(BaselineRow(**json.loads(value)) for name, value in report.user_properties
                             if name == PROPERTY)

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        write = terminalreporter.write_line
        terminalreporter.write_sep("=", "vitparity baseline drift")
        write(f"against {self.baseline.folder} (per token, float32 figures of {self.settings.dtype} features on "
              f"{self.settings.device}: projected cosine, relative norm difference)")
        if not self.rows:
            write("no golden test ran: no drift measured")
            return
        header = ("case", "side", "tokens", "min cos", "mean cos", "max norm drift", "mean norm drift", "verdict")
        cells = [(r.case, r.side, str(r.tokens), _cell(r.min_cos, ".6f"), _cell(r.mean_cos, ".6f"),
                  _cell(r.max_norm_rel, ".3e"), _cell(r.mean_norm_rel, ".3e"), r.verdict(self.baseline.min_cos))
                 for r in sorted(self.rows, key=lambda r: (r.case, r.side))]
        widths = [max(len(row[i]) for row in (header, *cells)) for i in range(len(header))]
        for row in (header, *cells):
            write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def baseline_property(row: BaselineRow) -> tuple[str, str]:
    """The JUnit user property of one row."""
    return PROPERTY, json.dumps(asdict(row))
