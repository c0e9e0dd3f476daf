"""Missing goldens are a state of their own: counted apart from regressions, said once with the command that
writes them.

Every golden test of a checking run (not an update) ends in one state, recorded as its JUnit property
`vitparity_golden_state`:

- `match`: its golden exists and the features match it;
- `regression`: its golden exists and the features differ from it (or it cannot be read);
- `missing`: no golden for this case and model. The test still fails (a run that checks goldens fails without
  them), with a short message; the property `vitparity_golden_missing` (JSON) says why: new weights (no golden
  folder of this model's fingerprint), new settings (folders of these weights under other settings only) or new
  cases (the folder exists, this case's golden does not).

The summary counts them (`goldens: 3 regressions, 12 missing (new weights hf a1b2c3d4e5f6)`) and one line says why
and gives the command that writes them; the same counts and command are the JUnit global property
`vitparity_goldens`, and `vitparity report-junit` counts missing goldens apart from failed tests.

Light at import (report-junit reads the names and counts without pytest, syrupy or the suite): what only a suite run
needs is imported by the function that uses it.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest
    from syrupy.assertion import SnapshotAssertion

    from ..snapshots import GoldenData

STATE_PROPERTY = "vitparity_golden_state"  # user property of a golden test: match, regression or missing
MISSING_PROPERTY = "vitparity_golden_missing"  # user property of a missing golden: MissingWhy as JSON
SUMMARY_PROPERTY = "vitparity_goldens"  # global JUnit property: the counts and the command that writes the missing
MATCH, REGRESSION, MISSING = "match", "regression", "missing"
NEW_WEIGHTS, NEW_SETTINGS, NEW_CASES = "new weights", "new settings", "new cases"
# Suite options of the run left out of the command that writes its missing goldens: the update covers every shard,
# writes what is missing (no regeneration of every golden) and needs no baseline.
NOT_IN_UPDATE = frozenset({"shard", "regenerate_goldens", "golden_baseline", "baseline_min_cos"})


def assertion_state(assertion: SnapshotAssertion) -> str:
    """The state of a syrupy snapshot assertion just made: MISSING when it recalled no golden, else MATCH or
    REGRESSION by its result."""
    result = assertion.executions[assertion.num_executions - 1]
    if result.recalled_data is None:
        return MISSING
    return MATCH if result.success else REGRESSION


def _plural(count: int, word: str) -> str:
    """`1 case`, `3 cases`."""
    return f"{count} {word}" + ("" if count == 1 else "s")


@dataclass(frozen=True)
class MissingWhy:
    """Why the goldens of one model (side) are missing from its golden folder."""

    side: str
    kind: str  # NEW_WEIGHTS, NEW_SETTINGS or NEW_CASES
    fingerprint: str
    settings: str  # dtype, frames and alignment: `float32-8of64-crop`
    folder: str  # the golden folder's name

    def short(self) -> str:
        """`new weights hf a1b2c3d4e5f6`, `new settings hf float32-4of64-crop` or `new cases hf`."""
        detail = {NEW_WEIGHTS: f" {self.fingerprint}", NEW_SETTINGS: f" {self.settings}"}.get(self.kind, "")
        return f"{self.kind} {self.side}{detail}"

    def long(self, cases: int) -> str:
        """Why `cases` goldens of this side are missing, in words."""
        if self.kind == NEW_WEIGHTS:
            return (f"new weights of {self.side} with fingerprint {self.fingerprint} have no goldens: "
                    f"{_plural(cases, 'case')}")
        if self.kind == NEW_SETTINGS:
            return (f"the weights of {self.side} (fingerprint {self.fingerprint}) have no goldens for {self.settings}: "
                    f"{_plural(cases, 'case')}")
        return f"{_plural(cases, 'case')} of {self.side} {'has' if cases == 1 else 'have'} no golden in {self.folder}"


def missing_why(side: str, folder: Path) -> MissingWhy:
    """Why `folder` (a golden folder named by `GoldenFolder`) holds no golden of a case of `side`: the folder exists
    (new cases), folders of the same weights exist under other settings only (new settings), or none of its
    fingerprint does (new weights)."""
    from ..snapshots import GoldenFolder

    parsed = GoldenFolder.parse(folder.name)
    if folder.is_dir():
        kind = NEW_CASES
    else:
        siblings = [GoldenFolder.parse(path.name) for path in folder.parent.iterdir()] if folder.parent.is_dir() else []
        same_weights = any(other is not None and (other.model_type, other.fingerprint)
                           == (parsed.model_type, parsed.fingerprint) for other in siblings)
        kind = NEW_SETTINGS if same_weights else NEW_WEIGHTS
    return MissingWhy(side, kind, parsed.fingerprint, parsed.settings, folder.name)


def record_state(node: pytest.Item, assertion: SnapshotAssertion, side: str, folder: Path, data: GoldenData) -> str:
    """Record the state of a checking run's golden assertion just made (and, when missing, why) as user properties
    of its test; return the test's failure message when the golden is missing ("" otherwise): one labelled line,
    then the golden folders of the same model type it could be measured against (--golden-baseline), if any."""
    from ..snapshots import other_model_folders_hint

    state = assertion_state(assertion)
    node.user_properties.append((STATE_PROPERTY, state))
    if state != MISSING:
        return ""
    why = missing_why(side, folder)
    node.user_properties.append((MISSING_PROPERTY, json.dumps(asdict(why))))
    lines = [f"missing golden: no golden for this case and model in {folder} ({why.short()}); the summary's "
             "'missing goldens' line gives the command that writes them"]
    lines += other_model_folders_hint(folder, data.meta.get("feature_shape", [None])[-1])
    return "\n".join(lines)


def update_command(config: pytest.Config) -> str:
    """The command that writes the missing goldens of this run: its program (pytest, or `vitparity gate`), `-m golden
    --snapshot-update`, and the suite options given on its command line (the environment and the ini file still
    hold theirs)."""
    from ..gate import TESTS
    from .options import OPTIONS, raw_value

    args = ["vitparity", "gate"] if TESTS in config.invocation_params.args else ["pytest"]
    args += ["-m", "golden", "--snapshot-update"]
    for option in OPTIONS:
        raw = raw_value(config, option)
        if raw.source == "cli" and raw.value and option.name not in NOT_IN_UPDATE:
            args.append(option.cli if option.flag else f"{option.cli}={raw.value}")
    return shlex.join(args)


@dataclass
class GoldenTally:
    """The states of a run's golden tests, and why the missing ones are missing."""

    states: Counter[str] = field(default_factory=Counter)  # state -> golden tests
    missing: Counter[MissingWhy] = field(default_factory=Counter)  # why -> golden tests

    def add(self, state: str, why: MissingWhy | None) -> None:
        self.states[state] += 1
        if why is not None:
            self.missing[why] += 1

    def add_properties(self, properties: list[tuple[str, str]]) -> None:
        """Count one golden test from its user properties (nothing when it recorded no state)."""
        found = dict(properties)
        if STATE_PROPERTY in found:
            why = found.get(MISSING_PROPERTY)
            self.add(found[STATE_PROPERTY], MissingWhy(**json.loads(why)) if why else None)

    def count_line(self) -> str:
        """`goldens: 3 regressions, 12 missing (new weights hf a1b2c3d4e5f6), 9 match`."""
        whys = ", ".join(why.short() for why in self.missing)
        return (f"goldens: {_plural(self.states[REGRESSION], 'regression')}, {self.states[MISSING]} missing"
                + (f" ({whys})" if whys else "") + f", {self.states[MATCH]} match")

    def missing_line(self, command: str) -> str:
        """One line: why goldens are missing and the command that writes them ("" when none is missing)."""
        if not self.missing:
            return ""
        regressions = self.states[REGRESSION]
        differing = "the golden that differs" if regressions == 1 else f"the {regressions} goldens that differ"
        caveat = f" (it also rewrites {differing}: review the regressions first)" if regressions else ""
        return ("missing goldens: " + "; ".join(why.long(cases) for why, cases in self.missing.items())
                + f"; write them with: {command}{caveat}")

    def summary(self, command: str) -> str:
        """The JUnit global property SUMMARY_PROPERTY: the counts per state and the command (JSON)."""
        return json.dumps({**{state: self.states[state] for state in (MATCH, REGRESSION, MISSING)},
                           "missing_why": [{**asdict(why), "tests": n} for why, n in self.missing.items()],
                           "command": command}, sort_keys=True)
