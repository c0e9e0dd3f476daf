"""What a suite process cost (forwards, tokens, loads, peak memory) and how it is written: the summary's cost lines
and the names of the properties that carry costs, comparisons and config warnings to the controller and to JUnit.

Kept free of pytest and torch so that `vitparity report-junit` reads what the suite wrote without importing the
suite.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

from ..rules import SIDES


@dataclass
class Cost:
    """Forwards, tokens and model loads of this process."""

    forwards: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIDES, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIDES, 0))
    loads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIDES, 0))
    groups: int = 0
    case_tokens: int = 0  # tokens of the cases compared, each counted once
    path_tokens: int = 0  # tokens of each (case, input path) compared, each counted once: the one-pass minimum
    determinism_cases: int = 0
    over_budget: list[str] = field(default_factory=list)
    peak_bytes: int = 0
    peak_kind: str = "RSS"
    companion_swaps: int = 0  # packed forwards with companions swapped, two per pack (counted in the packing forwards)
    layer_traces: int = 0  # failing cases traced layer by layer (their forwards are not in the counts above)
    attention: str = ""  # what the loaded models run: "packed backend sdpa, attention kernel default"
    probe_loads: int = 0  # models loaded in float32 for the float32 probe (vitparity.suite.probe)
    probe_forwards: int = 0  # the probe's float32 forwards (not in the counts above)
    probe_tokens: int = 0
    reference: dict[str, int] = field(default_factory=lambda: {"forwards": 0, "tokens": 0, "loads": 0})
    outputs_cases: int = 0  # cases whose last_hidden_state and pooler_output were compared
    batched_cases: int = 0  # cases whose hf features were also taken from a batch (counted in the hf forwards)
    grid_calls: int = 0  # packs called grid_thw only, beside their grid's explicit positions (two packing forwards)

    def count(self, side: str, tokens: int) -> None:
        self.forwards[side] += 1
        self.tokens[side] += tokens

    def measure_peak(self, device: str) -> None:
        """Peak memory so far: CUDA max allocated on a GPU, the process's max RSS on the CPU."""
        import torch  # only here: report-junit reads this module's keys and cost lines without torch

        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_bytes, self.peak_kind = int(torch.cuda.max_memory_allocated()), "CUDA max allocated"
        else:
            self.peak_bytes, self.peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"

    def to_dict(self) -> dict:
        return {
            "forwards": self.forwards, "tokens": self.tokens, "loads": self.loads, "groups": self.groups,
            "case_tokens": self.case_tokens, "path_tokens": self.path_tokens,
            "determinism_cases": self.determinism_cases, "over_budget": self.over_budget,
            "peak_bytes": self.peak_bytes, "peak_kind": self.peak_kind, "companion_swaps": self.companion_swaps,
            "layer_traces": self.layer_traces, "attention": self.attention, "reference": self.reference,
            "outputs_cases": self.outputs_cases, "batched_cases": self.batched_cases, "grid_calls": self.grid_calls,
            "probe_loads": self.probe_loads, "probe_forwards": self.probe_forwards, "probe_tokens": self.probe_tokens,
        }



PROPERTY = "vitparity"  # user property of a test: one Comparison row (JSON)
BASELINE_PROPERTY = "vitparity_baseline"  # user property of a golden test: its BaselineRow (`suite.baseline`, JSON)
FORWARDS_PROPERTY = "vitparity_forwards"  # user property of a test: the forwards it compared
COST_KEY = "vitparity_cost"  # xdist workeroutput: this worker's Cost (JSON)
LEFT_OUT_KEY = "vitparity_left_out"  # xdist workeroutput: why the plan deselected tests (JSON: reason -> names)
WARNINGS_KEY = "vitparity_config_warnings"  # xdist workeroutput and JUnit property: config differences (JSON list)
REFERENCE_KEY = "vitparity_reference"  # JUnit property: the outputs and reference line of the summary
CODE_KEY = "vitparity_code"  # JUnit property: side -> the code that ran it (`checkpoint_code.CodeRecord`, JSON)
RESTORED_KEY = "vitparity_restored_buffers"  # xdist workeroutput and JUnit property: "side: buffer" (JSON list)


def cost_line(cost: dict) -> str:
    """`forwards: hf N (T tokens), packing M (U tokens); forward tokens: 1.29x the one-pass minimum (each case and
    input path once)`: the minimum is one pass per (case, input path) compared: the packing model and each hf call
    of the case (the context call, and the explicit-positions call where it runs), the case's row of an hf batch
    where it is batched, and the packing model's grid_thw-only call and, for a video, its call with its grid's
    positions where the case takes them (the batch companions, and an image's pass with its grid positions, which
    are its usual ones, are above the minimum). Runs written before paths were
    counted have only `case_tokens`: their minimum is one hf and one packing pass per case. A float32 probe: `cost_details`."""
    forwards, tokens = cost["forwards"], cost["tokens"]
    line = (f"forwards: hf {forwards['hf']} ({tokens['hf']} tokens), "
            f"packing {forwards['packing']} ({tokens['packing']} tokens)")
    reference = cost.get("reference") or {"forwards": 0, "tokens": 0}
    if reference["forwards"]:
        line += f", reference {reference['forwards']} ({reference['tokens']} tokens)"
    minimum = _one_pass_minimum(cost)
    if minimum:
        by_path = " (each case and input path once)" if cost.get("path_tokens") else ""
        line += f"; forward tokens: {_forward_tokens(cost) / minimum:.2f}x the one-pass minimum{by_path}"
    return line


def _forward_tokens(cost: dict) -> int:
    """Tokens of every forward the run's checks made: both models' and the reference's (the probe's apart)."""
    return cost["tokens"]["hf"] + cost["tokens"]["packing"] + (cost.get("reference") or {}).get("tokens", 0)


def _one_pass_minimum(cost: dict) -> int:
    """One pass per (case, input path); runs written before paths were counted (JUnit XML of older runs) have only
    `case_tokens`: one hf and one packing pass per case. 0 when neither was counted."""
    return cost.get("path_tokens") or 2 * cost.get("case_tokens", 0)


def probe_details(cost: dict) -> str:
    """`float32 probe: 2 loads, 2 forwards (70 tokens), 1.31x the one-pass minimum counting it; ` (empty without a
    probe): the loads and forwards of the float32 probe of a 16-bit run (vitparity.suite.probe)."""
    if not cost.get("probe_loads"):
        return ""
    text = (f"float32 probe: {cost['probe_loads']} loads, {cost['probe_forwards']} forwards "
            f"({cost['probe_tokens']} tokens)")
    minimum = _one_pass_minimum(cost)
    if minimum:
        text += f", {(_forward_tokens(cost) + cost['probe_tokens']) / minimum:.2f}x the one-pass minimum counting it"
    return text + "; "


def cost_details(cost: dict) -> str:
    loads = cost["loads"]
    reference = (cost.get("reference") or {}).get("loads", 0)
    return (f"model loads: hf {loads['hf']}, packing {loads['packing']}"
            + (f", reference {reference}" if reference else "")
            + f"; {probe_details(cost)}outputs compared {cost.get('outputs_cases', 0)} cases; "
            f"batched {cost.get('batched_cases', 0)} cases; grid_thw-only calls {cost.get('grid_calls', 0)} packs; "
            f"pack groups {cost['groups']}; "
            f"determinism re-runs {cost['determinism_cases']}; companion swaps {cost['companion_swaps']}; "
            f"layer traces {cost['layer_traces']}; peak memory {cost['peak_bytes'] / 2**30:.2f} GiB "
            f"({cost['peak_kind']})")


def total_cost(costs: dict[str, dict]) -> dict:
    """The sum of several processes' costs (peak memory: the largest)."""
    total = Cost().to_dict()
    for cost in costs.values():
        for key in ("forwards", "tokens", "loads"):
            for side in SIDES:
                total[key][side] += cost[key][side]
        total["groups"] += cost["groups"]
        total["case_tokens"] += cost.get("case_tokens", 0)
        total["path_tokens"] += cost.get("path_tokens", 0)
        total["determinism_cases"] += cost["determinism_cases"]
        total["companion_swaps"] += cost["companion_swaps"]
        total["layer_traces"] += cost["layer_traces"]
        for key in ("probe_loads", "probe_forwards", "probe_tokens"):
            total[key] += cost.get(key, 0)
        for key in ("outputs_cases", "batched_cases", "grid_calls"):
            total[key] += cost.get(key, 0)
        for key, value in (cost.get("reference") or {}).items():
            total["reference"][key] += value
        total["attention"] = total["attention"] or cost["attention"]
        total["over_budget"] += cost["over_budget"]
        if cost["peak_bytes"] >= total["peak_bytes"]:
            total["peak_bytes"], total["peak_kind"] = cost["peak_bytes"], cost["peak_kind"]
    return total
