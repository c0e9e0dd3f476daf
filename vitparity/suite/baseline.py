"""Release-to-release drift: this run's features, case by case, against the goldens of a previous release.

`--golden-baseline=PATHS` names the previous release's golden root (e.g. its `fixtures/golden`: the folder of each
model of this pair under this run's dtype, frames and alignment is chosen in it), or golden folders
(`<model_type>-<fingerprint>-<dtype>-<F>of<C>-<align>`), several separated by os.pathsep: both models are measured
in one run. Each model of this pair has each case's golden reduction compared with the baseline golden of the same
case (`vitparity.snapshots.reduction_drift`: projected cosine and relative norm difference per token, float32). The
figures go to the summary (a table of their own) and to JUnit (user property `vitparity_baseline`, one JSON row
per golden test). `--baseline-min-cos=X` fails a case whose minimum projected cosine is not above X; without it
the drift is only reported.

A usage error names what cannot be compared: a named folder of another model type (the fingerprint's family),
dtype, frame protocol or alignment, a baseline whose feature width or layer count differs from this run's model
(e.g. the built-in tiny model's goldens for a real checkpoint), two baseline folders for one model, or none at all.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from ..pair import PairFiles
from ..snapshots import GoldenCorrupt, GoldenData, GoldenFolder, golden_shape, load_golden, reduction_drift
from .costs import BASELINE_PROPERTY as PROPERTY
from .settings import Settings



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
    limit: float | None = None  # --baseline-min-cos of the run (None: report only)

    def verdict(self, min_cos: float | None) -> str:
        if self.problem:
            return self.problem
        if min_cos is None:
            return "report only"
        return f"{'PASS' if self.passed else 'FAIL'} (min cos > {min_cos})"


@dataclass(frozen=True)
class Baseline:
    """The baseline golden folder of each side measured (side -> folder) and the failure limit (None: report
    only)."""

    folders: dict[str, Path]
    min_cos: float | None

    @property
    def label(self) -> str:
        return ", ".join(f"{side} {folder}" for side, folder in sorted(self.folders.items()))

    def covers(self, side: str) -> bool:
        """Whether the model of this side has a baseline folder."""
        return side in self.folders

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
                     f"{self.folders[side]} is not above --baseline-min-cos={self.min_cos} (mean {row.mean_cos:.6f}, "
                     f"max norm drift {row.max_norm_rel:.3e}; float32 figures)")

    def compare(self, data: GoldenData, side: str, golden_path: tuple[str, str]) -> BaselineRow:
        """`data` (one case and side of this run) against the baseline golden at <folder>/<module>/<stem>.npz.

        GoldenCorrupt naming the file when the baseline golden cannot be read."""
        path = self.folders[side] / golden_path[0] / f"{golden_path[1]}.npz"
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
        return BaselineRow(case, side, tokens, d.min_cos, d.mean_cos, d.max_norm_rel, d.mean_norm_rel, passed=passed,
                           limit=self.min_cos)


def comparable(folder: Path, width: int | None, layers: int | None) -> str:
    """"" when the goldens of `folder` can be compared with features of `width` from a model of `layers` layers,
    else the difference ("feature width 64, this run's model 1024"); a folder without a readable golden says so."""
    try:
        theirs_width, theirs_layers = golden_shape(folder)
    except (GoldenCorrupt, FileNotFoundError) as err:
        return str(err)
    for name, theirs, ours in (("feature width", theirs_width, width), ("layer count", theirs_layers, layers)):
        if theirs is not None and ours is not None and theirs != ours:
            return f"{name} {theirs}, this run's model {ours}"
    return ""


def _candidates(path: Path, where: str) -> tuple[list[tuple[Path, GoldenFolder]], bool]:
    """(golden folders of one --golden-baseline entry, whether it named a golden folder itself); a golden root
    gives every golden folder in it. UsageError when it is neither."""
    if not path.is_dir():
        raise pytest.UsageError(f"{where}: no such folder")
    parsed = GoldenFolder.parse(path.name)
    if parsed is not None:
        return [(path, parsed)], True
    inside = [(sub, GoldenFolder.parse(sub.name)) for sub in sorted(path.iterdir()) if sub.is_dir()]
    inside = [(sub, parsed) for sub, parsed in inside if parsed is not None]
    if not inside:
        raise pytest.UsageError(f"{where}: not a golden folder nor a root holding any (a golden folder's name reads "
                                "<model_type>-<fingerprint>-<dtype>-<F>of<C>-<align>, e.g. a folder under "
                                "fixtures/golden; a root is e.g. the previous release's fixtures/golden)")
    return inside, False


def check_baseline(settings: Settings, files: PairFiles) -> Baseline | None:
    """The `--golden-baseline` folders checked against this run's pair and settings (None when not given).

    pytest.UsageError naming what cannot be compared: not a golden folder or root, a named folder of another model
    type, dtype, frame protocol or alignment, a feature width or layer count that differs from this run's model,
    two folders for one model, or no folder for either model."""
    if not settings.golden_baseline:
        return None
    where = (f"{settings.labels.get('golden_baseline', '--golden-baseline')}="
             + os.pathsep.join(map(str, settings.golden_baseline)))
    configs = {"hf": files.hf_config, "packing": files.packing_config}
    context = files.temporal_context or settings.num_frames
    ours = {"dtype": settings.dtype, "frame protocol": f"{settings.num_frames}of{context}", "align": settings.align}
    chosen: dict[str, list[Path]] = {}
    for entry in settings.golden_baseline:
        label = f"{where}: {entry}" if len(settings.golden_baseline) > 1 else where
        candidates, named = _candidates(entry, label)
        for folder, parsed in candidates:
            sides = [side for side, config in configs.items() if config.get("model_type") == parsed.model_type]
            theirs = {"dtype": parsed.dtype, "frame protocol": f"{parsed.num_frames}of{parsed.context}",
                      "align": parsed.align}
            problem = (f"model type {parsed.model_type}, this pair's models are {configs['hf'].get('model_type')} "
                       f"and {configs['packing'].get('model_type')}" if not sides else
                       next((f"{name} {theirs[name]}, this run {ours[name]}" for name in ours
                             if theirs[name] != ours[name]), ""))
            if problem and named:
                raise pytest.UsageError(f"{label}: {problem}")
            if problem:
                continue  # a root holds goldens of other settings too
            for side in sides:
                config = configs[side]
                difference = comparable(folder, config.get("hidden_size"), config.get("num_hidden_layers"))
                if difference:
                    raise pytest.UsageError(f"{label}: {folder.name} cannot be compared with the {side} model: "
                                            f"{difference}")
                chosen.setdefault(side, []).append(folder)
    for side, folders in chosen.items():
        if len(folders) > 1:
            raise pytest.UsageError(f"{where}: {len(folders)} baseline folders for the {side} model: "
                                    f"{', '.join(str(f) for f in folders)} (name the previous release's)")
    if not chosen:
        raise pytest.UsageError(f"{where}: no golden folder of this pair's models ({configs['hf'].get('model_type')}, "
                                f"{configs['packing'].get('model_type')}) with "
                                f"{ours['dtype']}-{ours['frame protocol']}-{ours['align']}")
    return Baseline({side: folders[0] for side, folders in chosen.items()}, settings.baseline_min_cos)


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
        write(f"against {self.baseline.label} (per token, float32 figures of {self.settings.dtype} features on "
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
