"""The composite action (action.yml): its steps' commands, run here on the CPU as GitHub would run them (inputs and
the action's path put into each step's environment; GITHUB_OUTPUT and GITHUB_STEP_SUMMARY are files)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ACTION = yaml.safe_load((REPO / "action.yml").read_text())
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def _evaluate(text: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """The action's `${{ }}` expressions (those it uses; any other fails the test, to be taught here)."""

    def value(match: re.Match) -> str:
        expression = match.group(1)
        if expression == "github.action_path":
            return str(REPO)
        choice = re.fullmatch(r"inputs\.([a-z-]+) != '([^']*)' && '([^']*)' \|\| '([^']*)'", expression)
        if choice:  # GitHub's conditional: `inputs.NAME != 'v' && 'a' || 'b'` (a is never empty here)
            name, other, then, otherwise = choice.groups()
            return then if _evaluate(f"${{{{ inputs.{name} }}}}", inputs, outputs) != other else otherwise
        if re.fullmatch(r"inputs\.[a-z-]+", expression):
            name = expression.removeprefix("inputs.")
            return inputs.get(name, ACTION["inputs"][name].get("default", ""))
        if expression.startswith("steps.gate.outputs."):
            return outputs.get(expression.removeprefix("steps.gate.outputs."), "")
        raise AssertionError(f"action.yml: expression {expression!r} is not known to this test")

    return EXPRESSION.sub(value, text)


def _step(name: str) -> dict:
    (step,) = [step for step in ACTION["runs"]["steps"] if step["name"] == name]
    return step


def _run_step(name: str, inputs: dict[str, str], cwd: Path, outputs: dict[str, str] | None = None,
              extra_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run one `run:` step in bash; (the process, the outputs it wrote to GITHUB_OUTPUT)."""
    step, outputs = _step(name), outputs or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VITPARITY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` and `vitparity` of this venv
    output_file, summary = cwd / "github_output", cwd / "step_summary"
    output_file.write_text("")
    env.update(GITHUB_OUTPUT=str(output_file), GITHUB_STEP_SUMMARY=str(summary), **(extra_env or {}))
    env.update({key: _evaluate(str(value), inputs, outputs) for key, value in step.get("env", {}).items()})
    assert step["shell"] == "bash"
    process = subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], cwd=cwd, env=env, capture_output=True,
                             text=True)
    written = dict(line.split("=", 1) for line in output_file.read_text().splitlines() if "=" in line)
    return process, written


def test_the_install_step_takes_the_shipped_lock(tmp_path: Path) -> None:
    """Dry run of pip (no download): the default constraints are the action's constraints/gate-lock.txt."""
    dry = {"PIP_DRY_RUN": "1", "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1"}
    process, _ = _run_step("Install vitparity", {"package": "pytest"}, tmp_path, extra_env=dry)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "Requirement already satisfied: pytest" in process.stdout
    wrong = {"package": "pytest", "constraints": str(tmp_path / "missing.txt")}
    process, _ = _run_step("Install vitparity", wrong, tmp_path, extra_env=dry)
    assert process.returncode != 0 and "missing.txt" in process.stdout + process.stderr


def test_the_gate_steps_report_and_fail_on_a_missing_golden(tmp_path: Path) -> None:
    """The gate step on the built-in models (CPU) with a release's golden folder that lacks one golden: its status
    is pytest's, the JUnit file and the job summary are written, and the last step fails the job."""
    goldens = Path(shutil.copytree(REPO / "fixtures" / "golden", tmp_path / "goldens"))
    next(goldens.rglob("test_golden[[]image-coffee_small.jpg-packing].npz")).unlink()
    inputs = {"device": "cpu", "workers": "0", "golden-dir": "goldens",
              "pytest-args": "-p no:randomly -p no:cacheprovider -k 'coffee_small and golden'"}
    gate, outputs = _run_step("Parity gate", inputs, tmp_path)
    assert gate.returncode == 0, gate.stderr[-3000:]  # the step records the status; the last step fails
    assert outputs == {"status": "1"}, gate.stdout[-3000:]
    assert "1 failed, 1 passed" in gate.stdout
    assert (tmp_path / "parity-report" / "junit.xml").is_file()
    summary, _ = _run_step("Parity table in the job summary", inputs, tmp_path)
    assert summary.returncode == 0 and "test_golden" in (tmp_path / "step_summary").read_text()
    verdict, _ = _run_step("The gate passed", inputs, tmp_path, outputs)
    assert verdict.returncode == 1 and "pytest exit status 1" in verdict.stdout
    passed, _ = _run_step("The gate passed", inputs, tmp_path, {"status": "0"})
    assert passed.returncode == 0


def test_given_media_are_the_only_cases(tmp_path: Path) -> None:
    """The `media` input: its files are the cases, the bundled media are left out."""
    (tmp_path / "media").mkdir()
    shutil.copy(REPO / "fixtures" / "media" / "coffee_small.jpg", tmp_path / "media" / "espresso.jpg")
    inputs = {"device": "cpu", "workers": "0", "media": "media",
              "pytest-args": "-p no:randomly -p no:cacheprovider -m 'not golden' -k test_parity"}
    gate, outputs = _run_step("Parity gate", inputs, tmp_path)
    assert outputs == {"status": "0"}, gate.stdout[-3000:] + gate.stderr[-3000:]
    junit = (tmp_path / "parity-report" / "junit.xml").read_text()
    assert 'name="test_parity[image-espresso.jpg]"' in junit and "1 passed" in gate.stdout, gate.stdout[-3000:]
    assert "coffee_small" not in gate.stdout


def test_the_versions_that_differ_from_the_lock_go_to_the_job_summary(tmp_path: Path) -> None:
    """Against the shipped lock (this environment's freeze, see its header) and against a lock of other pins."""
    process, _ = _run_step("Versions against the lock", {}, tmp_path)
    assert process.returncode == 0, process.stderr
    summary = (tmp_path / "step_summary").read_text()
    assert summary.startswith(("Installed versions: exactly constraints/gate-lock.txt.",
                               "### Versions that differ from constraints/gate-lock.txt"))
    other = tmp_path / "action"
    (other / "constraints").mkdir(parents=True)
    (other / "constraints" / "gate-lock.txt").write_text("# a lock\npytest==1.0.0\nno-such-package==2.0\n")
    step = _step("Versions against the lock")
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(tmp_path / "other_summary"),
           "VP_LOCK": str(other / "constraints" / "gate-lock.txt"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], env=env, check=True)
    text = (tmp_path / "other_summary").read_text()
    assert "| pytest | 1.0.0 | " in text and "| no-such-package | 2.0 | not installed |" in text


def test_regenerate_writes_the_goldens_against_a_baseline_and_the_code_input_is_checked(tmp_path: Path) -> None:
    """`regenerate: true` writes the run's goldens into golden-dir (the upload step's folder), `golden-baseline`
    reports each case's drift against the previous release's goldens, `code: own` runs vitparity's classes, and a
    `code` or `regenerate` value that is neither choice stops the step with status 4 before any run."""
    inputs = {"device": "cpu", "workers": "0", "golden-dir": "new-goldens", "regenerate": "true", "code": "own",
              "golden-baseline": str(REPO / "fixtures" / "golden"),
              "pytest-args": "-p no:randomly -p no:cacheprovider -k 'coffee_small and golden'"}
    gate, outputs = _run_step("Parity gate", inputs, tmp_path)
    assert outputs == {"status": "0"}, gate.stdout[-3000:] + gate.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "new-goldens").rglob("*.npz")) == [
        "test_golden[image-coffee_small.jpg-hf].npz", "test_golden[image-coffee_small.jpg-packing].npz"]
    assert "vitparity baseline drift" in gate.stdout and "vitparity's own classes" in gate.stdout
    assert _step("Upload the regenerated goldens for review")["with"]["path"] == "${{ inputs.golden-dir }}"
    for name, value in (("code", "relase"), ("regenerate", "yes")):
        refused, outputs = _run_step("Parity gate", {**inputs, name: value}, tmp_path)
        assert outputs == {"status": "4"} and f"the {name} input is" in refused.stdout
