"""What the run says at its end: the per-case table, the cost of the run per worker and in total, and why a run
failed when no test did. Works in one process and under xdist (workers send their cost to the controller)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..compare import comparison_from_row
from ..junit_report import add_suite_properties
from ..report import format_table, worst_case_line, worst_first
from .golden_state import REGRESSION, SUMMARY_PROPERTY, GoldenTally, update_command
from .costs import (CODE_KEY, COST_KEY, LEFT_OUT_KEY, PROPERTY, REFERENCE_KEY, RESTORED_KEY, WARNINGS_KEY, cost_details,
                    cost_line, total_cost)
from .representative import media_scale, warnings as representative_warnings
from .run_record import RUN_KEY, run_record
from .session import ParitySession

class ParityReporter:
    """Collects comparisons (from this process or the workers) and costs, prints the summary, fills JUnit."""

    def __init__(self, session: ParitySession) -> None:
        self.session = session
        self.rows: list[dict] = []
        self.costs: dict[str, dict] = {}
        self.config_warnings: list[str] = []
        self.restored_buffers: list[str] = []
        self.junit_properties: list[tuple[str, str]] = []  # global JUnit properties (name, value)
        self.goldens = GoldenTally()  # states of the golden tests (match, regression, missing)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.rows.extend(json.loads(value) for name, value in report.user_properties if name == PROPERTY)
            self.goldens.add_properties(report.user_properties)

    def pytest_testnodedown(self, node, error) -> None:
        """Under xdist, on the controller: a worker's cost as it shuts down."""
        output = getattr(node, "workeroutput", {})
        if not self.session.left_out:  # every worker collects and selects alike; the controller collects nothing
            self.session.left_out = json.loads(output.get(LEFT_OUT_KEY, "{}"))
        if output.get(COST_KEY):
            self.costs[node.gateway.id] = json.loads(output[COST_KEY])
        _merge(self.config_warnings, json.loads(output.get(WARNINGS_KEY, "[]")))
        _merge(self.restored_buffers, json.loads(output.get(RESTORED_KEY, "[]")))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """This process's cost: sent to the controller by a worker; kept, and put in the JUnit XML, otherwise."""
        cost, warnings, restored = self.session.cost, self.session.config_warnings(), self.session.restored_buffers()
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[WARNINGS_KEY] = json.dumps(warnings)
            workeroutput[RESTORED_KEY] = json.dumps(restored)
            workeroutput[LEFT_OUT_KEY] = json.dumps(self.session.left_out)
        else:
            _merge(self.config_warnings, warnings)
            _merge(self.restored_buffers, restored)
        if any(cost.forwards.values()) or any(cost.loads.values()):
            cost.measure_peak(self.session.settings.device)
            if workeroutput is not None:
                workeroutput[COST_KEY] = json.dumps(cost.to_dict())
            else:
                self.costs["main"] = cost.to_dict()
        self._junit_properties(session.config)

    def _junit_properties(self, config: pytest.Config) -> None:
        """The run's global JUnit properties (run record, code, reference, warnings, costs), written into the
        `--junitxml` file once pytest has written it (`pytest_unconfigure`)."""
        if hasattr(config, "workerinput") or not config.getoption("xmlpath", None):
            return
        s = self.session.settings
        scale = media_scale(self.session.plan.all_groups, s.pack_tokens) if self.session.plan.all_groups else None
        props = [(RUN_KEY, json.dumps(run_record(s, scale.line() if scale else "",
                                                 representative_warnings(scale, s.device))))]
        code = self.session.code()
        if code:
            props.append((CODE_KEY, json.dumps({side: record.to_dict() for side, record in code.items()})))
        props.append((REFERENCE_KEY, reference_line(self.session.settings, self.session.plan)))
        if self.config_warnings:
            props.append((WARNINGS_KEY, json.dumps(self.config_warnings)))
        if self.restored_buffers:
            props.append((RESTORED_KEY, json.dumps(self.restored_buffers)))
        if self.goldens.states:
            props.append((SUMMARY_PROPERTY, self.goldens.summary(update_command(config))))
        if self.costs:
            props += [(f"vitparity_cost_{worker}", json.dumps(cost, sort_keys=True))
                      for worker, cost in sorted(self.costs.items())]
            props.append(("vitparity_cost", cost_line(total_cost(self.costs))))
        self.junit_properties = props

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """After pytest's junitxml plugin has written the file (its sessionfinish): add the global properties."""
        if self.junit_properties:
            add_suite_properties(Path(config.getoption("xmlpath")), self.junit_properties)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        s, plan = self.session.settings, self.session.plan
        if not (self.rows or self.costs or s.shard):
            return  # no parity test ran (e.g. another test tree in this repository)
        terminalreporter.write_sep("=", "vitparity parity summary")
        code = self.session.code()
        if code:
            terminalreporter.write_line("code checked: " + "; ".join(f"{side}: {record.headline()}"
                                                                    for side, record in code.items()))
            for side, record in code.items():
                terminalreporter.write_line(f"  {side} code: {record.describe()}")
            for note in self.session.code_notes():
                terminalreporter.write_line(f"NOTE: the two checkpoints' code differs in a shared part: {note}")
        terminalreporter.write_line(reference_line(s, plan), yellow=bool(plan.reference_off and s.trust_remote_code))
        terminalreporter.write_line(
            f"hf: {s.hf_model}  packing: {s.packing_model}  device: {s.device}  dtype: {s.dtype}  "
            f"threshold: min cos > {s.threshold}  (figures: float32 comparisons)"
        )
        probe = f"  float32 probe: the run's smallest case, judged by {s.probe_bars.describe()}" if s.probes else ""
        terminalreporter.write_line(f"precision {s.bars.describe()}{probe}")
        terminalreporter.write_line(f"scales: {','.join(f'{scale:g}' for scale in s.scales)}")
        for warning in self.config_warnings:
            terminalreporter.write_line(
                f"WARNING: config difference {warning} (changes numerics only: feature parity decides; "
                "--strict-model-config fails on it)", yellow=True,
            )
        if self.restored_buffers:
            terminalreporter.write_line(
                f"restored buffers: {', '.join(self.restored_buffers)} (left wrong by loading, restored from a fresh "
                "construction of the model class; --strict-buffers fails instead)", yellow=True,
            )
        shard = f"shard {s.shard}: " if s.shard else ""
        terminalreporter.write_line(
            f"{shard}{len(plan.groups)} of {len(plan.all_groups)} pack groups (budget {s.pack_tokens} tokens), "
            f"{sum(len(g.cases) for g in plan.groups)} cases; determinism {s.determinism}: "
            f"{len(plan.determinism)} cases re-run; companions {s.companions}: "
            f"{len(plan.companions)} groups with a swap"
        )
        scale = media_scale(plan.all_groups, s.pack_tokens) if plan.all_groups else None
        if scale is not None:
            terminalreporter.write_line(scale.line())
        for warning in representative_warnings(scale, s.device):
            terminalreporter.write_line(f"WARNING: {warning}", yellow=True)
        for reason, names in self.session.left_out.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            terminalreporter.write_line(f"not run by the plan ({reason}): {shown}")
        for worker, cost in sorted(self.costs.items()):
            terminalreporter.write_line(f"{worker}: {cost_line(cost)}; {cost_details(cost)}")
            for group in cost["over_budget"]:
                terminalreporter.write_line(f"{worker}: over the token budget: {group}", yellow=True)
        if len(self.costs) > 1:
            total = total_cost(self.costs)
            terminalreporter.write_line(f"total: {cost_line(total)}; {cost_details(total)}")
        if self.rows:
            comparisons = worst_first([comparison_from_row(r) for r in self.rows])
            terminalreporter.write_line(format_table(comparisons))
            terminalreporter.write_line(worst_case_line(comparisons))
            failed = sum(not r["passed"] for r in self.rows)
            terminalreporter.write_line(f"{len(self.rows)} comparisons, {len(self.rows) - failed} passed, {failed} failed")
        if self.goldens.states:
            terminalreporter.write_line(self.goldens.count_line(), red=bool(self.goldens.states[REGRESSION]),
                                        yellow=bool(self.goldens.missing) and not self.goldens.states[REGRESSION])
            if self.goldens.missing:
                terminalreporter.write_line(self.goldens.missing_line(update_command(terminalreporter.config)),
                                            yellow=True)


def reference_line(settings, plan) -> str:
    """What the run compared after the penultimate features, and whether vitparity's own classes ran as a reference
    (and on how many cases), or why not."""
    outputs = (f"outputs {settings.outputs}: last_hidden_state and pooler_output compared on {len(plan.outputs)} "
               "cases")
    if plan.reference_off:
        return f"{outputs}; reference OFF ({plan.reference_off})"
    return (f"{outputs}; reference: vitparity's own classes on the hf checkpoint's weights, on "
            f"{len(plan.reference)} cases")


def _merge(known: list[str], new: list[str]) -> None:
    """Append the items of `new` that `known` does not hold yet (the same from every worker)."""
    known.extend(item for item in new if item not in known)


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
