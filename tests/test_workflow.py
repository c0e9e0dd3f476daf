"""The GPU workflow (.github/workflows/gpu-parity.yml) read as data, and its verdict scripts run under bash with
each outcome of the shards: no green without a check, except the announced skip of a fork's pull request."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from vitparity.suite.options import OPTIONS

from conftest import REPO

WORKFLOW = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-parity.yml").read_text())


def step(job: str, name: str) -> dict:
    return next(s for s in WORKFLOW["jobs"][job]["steps"] if s.get("name") == name)


def run_step(job: str, name: str, tmp_path: Path, **env: str) -> tuple[int, str, str]:
    """(exit status, stdout, job summary) of a step's script under bash -e, as the runner runs it."""
    summary = tmp_path / "summary.md"
    summary.write_text("")
    result = subprocess.run(["bash", "-e", "-c", step(job, name)["run"]], capture_output=True, text=True,
                            env={**os.environ, "GITHUB_STEP_SUMMARY": str(summary), **env}, timeout=30)
    return result.returncode, result.stdout, summary.read_text()


@pytest.mark.parametrize("result, fork, status", [
    ("success", "false", 0),
    ("failure", "false", 1),
    ("cancelled", "false", 1),
    ("skipped", "false", 1),  # shards that did not run are no pass
    ("skipped", "true", 0),  # a fork's pull request: announced, not gated
    ("failure", "true", 1),
])
def test_the_final_job_passes_only_when_the_shards_passed(tmp_path, result, fork, status) -> None:
    assert WORKFLOW["jobs"]["parity"]["if"] == "always()"
    code, out, _ = run_step("parity", "Every shard passed", tmp_path, SHARD_RESULT=result, FORK_PR=fork)
    assert code == status, out


def test_a_fork_skip_is_announced_in_the_summary(tmp_path) -> None:
    name = "A fork's pull request is announced, not gated"
    assert step("parity", name)["if"] == "needs.shard.result == 'skipped'"
    assert "NOT GATED: pull request from a fork" in run_step("parity", name, tmp_path, FORK_PR="true")[2]
    assert run_step("parity", name, tmp_path, FORK_PR="false")[2] == ""


def test_the_release_run_uses_its_media_folder() -> None:
    inputs = WORKFLOW[True]["workflow_dispatch"]["inputs"]  # PyYAML reads the key `on` as True
    assert {"media_dir", "require_representative"} <= set(inputs)
    env = WORKFLOW["jobs"]["shard"]["env"]
    assert "inputs.media_dir" in env["VITPARITY_MEDIA"] and "vars.VITPARITY_MEDIA" in env["VITPARITY_MEDIA"]
    assert "inputs.require_representative" in env["VITPARITY_REQUIRE_REPRESENTATIVE"]
    known = {option.env for option in OPTIONS}
    assert sorted(name for name in env if name.startswith("VITPARITY_") and name not in known) == []
    check = step("shard", "GPUs and checkpoints")["run"]
    assert "a release run needs its media folder" in check and 'github.ref_type }}" = "tag"' in check


def test_the_jobs_media_reach_the_gate() -> None:
    """The action sets the gate's variables from its inputs (an input left out is the suite's default, whatever the
    job's environment says), so every variable the job sets and the action's gate step also sets is passed as the
    input it comes from, with the same value: a media folder set for the job only would never reach the gate."""
    action = yaml.safe_load((REPO / "action.yml").read_text())
    gate_env = next(s for s in action["runs"]["steps"] if s["name"] == "Parity gate")["env"]
    given = next(s for s in WORKFLOW["jobs"]["shard"]["steps"] if s.get("uses") == "./")["with"]
    job_env = WORKFLOW["jobs"]["shard"]["env"]
    for name, value in gate_env.items():
        plain = re.fullmatch(r"\$\{\{ inputs\.([a-z-]+) \}\}", str(value))
        if plain and name in job_env:
            source = plain.group(1)
            assert source in given, f"the job sets {name} but does not pass the action's input {source}"
            if "vars." in str(job_env[name]) or "inputs." in str(job_env[name]):
                assert given[source] == job_env[name], (name, given[source], job_env[name])
    assert "inputs.media" in gate_env["VITPARITY_NO_BUNDLED_MEDIA"]  # given media: only they are cases


def test_the_suites_variables_are_the_ones_ci_sets() -> None:
    """An option is an environment variable only when CI sets it (the workflow, the composite action, tox's gpu
    environment, .ci/); every other option is a flag and an ini key."""
    files = [REPO / ".github" / "workflows" / "gpu-parity.yml", REPO / "action.yml", REPO / "tox.ini",
             *(REPO / ".ci").iterdir()]
    set_by_ci = {name for path in files for name in re.findall(r"\b(VITPARITY_[A-Z_]+)\s*[:=]", path.read_text())}
    assert set_by_ci == {option.env for option in OPTIONS if option.env}
