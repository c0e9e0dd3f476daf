"""A fast start: the commands that need no model, and pytest's help with the suite's plugin, never import torch or
transformers (an import-graph check, not a timing; the times are in docs/benchmarks.md). `python -X importtime` lists every module a process imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vitparity.builtin import BUILTIN_GOLDEN

HEAVY = ("torch", "transformers")
GOLDEN = next(BUILTIN_GOLDEN.rglob("*.npz"))


def imported_modules(*args: str, cwd: Path | None = None) -> tuple[int, set[str]]:
    """(exit status, every module imported) of `python -X importtime ARGS`."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=cwd)
    names = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    return run.returncode, names


def heavy(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.split(".")[0] in HEAVY)


@pytest.mark.parametrize("args, status", [
    (["--version"], 0),
    (["--help"], 0),
    (["extract", "--help"], 0),
    (["golden-show", str(GOLDEN)], 0),
    (["extract", "--dtype", "float8"], 2),  # argparse: a bad option value
    (["extract", "--image1", "a.jpg", "--threshold", "1.5"], 2),
    (["extract", "--image1", "a.jpg", "--hf_model_path", "/no/such/hf", "--packing_model_path", "/no/such/p"], 2),
    (["convert", "/no/such/checkpoint", "/no/such/output"], 2),
    (["report-junit", "/no/such/junit.xml"], 2),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_command_imports_neither_torch_nor_transformers(args: list[str], status: int) -> None:
    code, names = imported_modules("-m", "vitparity", *args)
    assert code == status
    assert "vitparity.cli" in names and heavy(names) == []


def test_pytest11_entry_point_is_light() -> None:
    """The entry point every pytest run of the environment loads."""
    code, names = imported_modules("-c", "import vitparity.suite.rootdir_check")
    assert code == 0 and "vitparity.suite.rootdir_check" in names and heavy(names) == []


def test_pytest_help_with_the_suite_plugin_is_light(tmp_path: Path) -> None:
    """`pytest --help` lists the suite's options without setting the suite up (no ini file here)."""
    code, names = imported_modules("-m", "pytest", "-p", "vitparity.pytest_plugin", "--help", cwd=tmp_path)
    # The plugin itself is assertion-rewritten, so not listed: the options module it registers is.
    assert code == 0 and "vitparity.suite.options" in names and heavy(names) == []


def test_a_usage_error_of_the_suite_options_is_light(tmp_path: Path) -> None:
    """A bad value that the arguments decide is refused before torch loads."""
    code, names = imported_modules("-m", "pytest", "-p", "vitparity.pytest_plugin", "--num-frames=abc", "--pyargs",
                                   "vitparity.parity_tests", cwd=tmp_path)
    assert code == 4 and "vitparity.suite.settings" in names and heavy(names) == []
