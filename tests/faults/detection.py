"""What one parity-suite run against a variant found, and the detection table.

`python -m tests.faults.detection DIR` (from the repository root) renders the Markdown table from the JSON
records that `tests/test_faults.py` writes into DIR when VITPARITY_FAULTS_OUT=DIR is set.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

PARITY_PROPERTY = "vitparity"  # user property carrying a Comparison row (see vitparity.pytest_plugin)
GOLDEN_COS = re.compile(r"min projected cosine (-?[0-9.]+(?:e-?\d+)?|nan)")
GOLDEN_MISSING = "no golden for this case"
DTYPE_ORDER = ("float32", "bfloat16")


@dataclass
class Detection:
    """Outcome of one suite run: which tests failed and how far the features moved."""

    variant: str
    kind: str  # "fault" or "benign"
    side: str
    dtype: str
    exit_code: int
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # a verdict: pytest.fail or a failed assert in the test call
    errors: list[str] = field(default_factory=list)  # "test_id: message" of any other failure (crash, setup error)
    skipped: list[str] = field(default_factory=list)
    collection_errors: list[str] = field(default_factory=list)
    parity_min_cos: float | None = None  # worst min per-token cosine over the suite's recorded comparisons
    parity_max_abs: float | None = None  # largest absolute feature difference over those comparisons
    golden_min_cos: float | None = None  # worst projected cosine over the goldens that failed by value
    golden_missing: int = 0  # golden tests that failed because no golden exists for the model
    divergences: list[str] = field(default_factory=list)  # "<trace>: <first divergence in words>" of each layer trace
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed) + len(self.errors) + len(self.skipped)

    @property
    def ran(self) -> bool:
        """The suite collected and ran tests (no usage error, no collection error)."""
        return self.exit_code in (0, 1) and not self.collection_errors and self.total > 0

    @property
    def detected(self) -> bool:
        return bool(self.failed)

    @property
    def as_required(self) -> bool:
        """Faults: caught by at least one failing verdict; benign: every test passed. Never a crash."""
        if not self.ran or self.errors:
            return False
        return self.detected if self.kind == "fault" else (not self.failed and not self.skipped)

    def failed_groups(self) -> str:
        return group_tests(self.failed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Detection":
        return cls(**json.loads(text))


def short_test_id(nodeid: str) -> str:
    """parity_tests/test_golden.py::test_golden[image-x.jpg-packing] -> test_golden[image-x.jpg-packing]."""
    return nodeid.rsplit("::", 1)[-1]


def group_of(test_id: str) -> str:
    """The test function, with the side for per-side tests: test_golden[packing], test_parity, test_packed_batch."""
    name, _, params = test_id.partition("[")
    params = params.rstrip("]")
    for side in ("hf", "packing"):
        if params == side or params.endswith("-" + side):
            return f"{name}[{side}]"
    return name


def group_tests(test_ids: list[str]) -> str:
    """`test_parity x8, test_golden[packing] x8, test_packed_batch` in first-seen order."""
    counts = Counter(group_of(t) for t in test_ids)
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items()) or "-"


def _worst(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return min(finite) if finite else None


def _largest(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


# How the suite's tests fail: pytest.fail ("Failed: ..."), or an assert (golden tests, through syrupy), which
# pytest reports as "AssertionError: ..." or, when it rewrote the assert, as "assert <explanation>".
VERDICTS = ("Failed", "AssertionError", "assert ")


def failure_message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr)
    return message.strip().splitlines()[0] if message.strip() else ""


def divergences(test_reports) -> list[str]:
    """`<trace name>: <first divergence in words>` of every layer trace the run's tests recorded (JUnit property
    `trace[<name>] divergence`, vitparity.trace.divergence_words), once each."""
    found = [f"{name[len('trace['):-len('] divergence')]}: {value}" for report in test_reports if report.when == "call"
             for name, value in report.user_properties if name.startswith("trace[") and name.endswith("] divergence")]
    return list(dict.fromkeys(found))


def detection_from_reports(variant, dtype: str, exit_code: int, test_reports, collect_reports, seconds: float = 0.0) -> Detection:
    """Build a Detection from pytest's TestReport objects (all phases) and CollectReport objects of one run.

    Only a failure of the test call itself through pytest.fail or an assertion counts as a verdict; an exception
    elsewhere (a crash of the model, a fixture error) is an error, which no variant may cause.
    """
    outcome: dict[str, str] = {}
    errors: list[str] = []
    rows, golden_cos, missing = [], [], 0
    for report in test_reports:
        test_id = short_test_id(report.nodeid)
        if report.failed:
            message = failure_message(report)
            if report.when == "call" and message.startswith(VERDICTS):
                outcome[test_id] = "failed"
            else:
                outcome[test_id] = "error"
                errors.append(f"{test_id} ({report.when}): {message}")
            text = report.longreprtext
            if GOLDEN_MISSING in text:
                missing += 1
            golden_cos += [float(m) for m in GOLDEN_COS.findall(text)]
        elif report.skipped:
            outcome.setdefault(test_id, "skipped")
        elif report.when == "call":
            outcome.setdefault(test_id, "passed")
        if report.when == "call":
            rows += [json.loads(value) for name, value in report.user_properties if name == PARITY_PROPERTY]
    by_outcome = {state: [t for t, s in outcome.items() if s == state] for state in ("passed", "failed", "skipped")}
    return Detection(
        variant=variant.name, kind=variant.kind, side=variant.side, dtype=dtype, exit_code=int(exit_code),
        passed=by_outcome["passed"], failed=by_outcome["failed"], skipped=by_outcome["skipped"], errors=errors,
        collection_errors=[r.nodeid for r in collect_reports if r.failed],
        parity_min_cos=_worst([row.get("min_cos") for row in rows]),
        parity_max_abs=_largest([row.get("max_abs") for row in rows]),
        golden_min_cos=_worst(golden_cos), golden_missing=missing, seconds=round(seconds, 2),
        divergences=divergences(test_reports),
    )


def _cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _golden(d: Detection) -> str:
    parts = [_cos(d.golden_min_cos)] if d.golden_min_cos is not None else []
    if d.golden_missing:
        parts.append(f"{d.golden_missing} missing")
    return ", ".join(parts) or "-"


COLUMNS = ("variant", "kind", "dtype", "failed", "tests failed", "parity min cos", "golden min cos", "detected", "as required")


def _cells(d: Detection) -> tuple[str, ...]:
    return (
        d.variant, d.kind, d.dtype, f"{len(d.failed)}/{d.total}" + (f" +{len(d.errors)} errors" if d.errors else ""),
        d.failed_groups(), _cos(d.parity_min_cos),
        _golden(d), "yes" if d.detected else "no", "yes" if d.as_required else "NO",
    )


def format_text_table(detections: list[Detection]) -> str:
    """A fixed-width table for the terminal."""
    rows = [COLUMNS, *(_cells(d) for d in detections)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table(detections: list[Detection]) -> str:
    rows = [COLUMNS, ("---",) * len(COLUMNS), *(_cells(d) for d in detections)]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)


def sort_key(order: list[str]):
    def key(d: Detection):
        position = order.index(d.variant) if d.variant in order else len(order)
        dtype = DTYPE_ORDER.index(d.dtype) if d.dtype in DTYPE_ORDER else len(DTYPE_ORDER)
        return (dtype, position, d.variant)

    return key


def load_detections(folder: Path) -> list[Detection]:
    return [Detection.from_json(path.read_text()) for path in sorted(Path(folder).glob("*.json"))]


STEP_COLUMNS = ("variant", "kind", "dtype", "step named (each traced side)", "true step", "named it")


def format_step_table(detections: list[Detection], expected: dict[str, str]) -> str:
    """Markdown: the step each run's layer traces named (their distinct divergences in words, trace names left out)
    against the variant's true step (`expected`: variant -> Variant.step), and whether every trace named it."""
    from . import names_step

    rows = [STEP_COLUMNS, ("---",) * len(STEP_COLUMNS)]
    for d in detections:
        named = list(dict.fromkeys(line.split(": ", 1)[1] for line in d.divergences)) or ["none"]
        true = expected.get(d.variant, "none")
        verdict = "yes" if all(names_step(line, true) for line in named) else "NO"
        if d.kind == "fault" and named == ["none"] and verdict == "yes":
            verdict = "n/a: no failing test traces layers"
        rows.append((f"`{d.variant}`", d.kind, d.dtype, "; ".join(named), true, verdict))
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)


def main(argv: list[str]) -> int:
    steps = argv[:1] == ["--steps"]
    if len(argv) != 1 + steps:
        print("usage: python -m tests.faults.detection [--steps] DIR   (DIR: the VITPARITY_FAULTS_OUT of a test_faults "
              "run, or its release/<plan> folder; --steps: the step each run's traces named, from tests/: "
              "python -m faults.detection --steps DIR)")
        return 2
    from . import VARIANTS

    detections = load_detections(Path(argv[-1]))
    if not steps:
        print(format_markdown_table(sorted(detections, key=sort_key([v.name for v in VARIANTS]))))
        return 0
    from .release import RELEASE_VARIANTS

    every = [*RELEASE_VARIANTS, *VARIANTS]
    print(format_step_table(sorted(detections, key=sort_key([v.name for v in every])), {v.name: v.step for v in every}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
