"""Shared fixtures of the project's tests: a scratch copy of the parity suite to run end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["pytester", "faults.isolation"]  # faults.isolation: the isolated and modules_cache fixtures

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "fixtures" / "golden"
# case, tokens, max abs, mean abs, min cos, mean cos, then mean 1-cos and norm gap (each "value (fraction of bar)")
ROW = re.compile(r"^((?:[\w~]+/)?(?:image|video|codec|assets)-\S+)\s+\d+\s+\S+\s+\S+\s+\S+\s+\S+(?:\s+\S+(?: \(\S+\))?){0,2}\s+"
                 r"(PASS|FAIL)", re.M)


@dataclass
class SuiteCopy:
    """The parity suite (conftest, parity_tests, ini, goldens) copied into a pytester folder."""

    pytester: pytest.Pytester

    @property
    def path(self) -> Path:
        return self.pytester.path

    @property
    def golden_root(self) -> Path:
        return self.path / "fixtures" / "golden"

    def run(self, *args: str) -> pytest.RunResult:
        """The suite in this process, on the CPU; write path options as --option=PATH."""
        return self.pytester.runpytest_inprocess("-p", "no:cacheprovider", "--device=cpu", *args)

    def goldens(self) -> dict[str, bytes]:
        return golden_files(self.golden_root)


def golden_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every golden under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npz"))}


def edited_checkpoint(source: Path, folder: Path, **fields: object) -> Path:
    """A copy of a checkpoint folder with config.json fields changed, as a release's config would differ."""
    folder = Path(shutil.copytree(source, folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def verdicts(output: str) -> dict[str, str]:
    """Case -> PASS / FAIL, read from the suite's summary table."""
    return {m.group(1): m.group(2) for m in ROW.finditer(output)}


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """pytest's pytester, with the suite's test modules that this process imported under their plain names (`pytest .`
    collects parity_tests/ too) set aside for the test, so that an inner run imports its own copy of them."""
    suite_modules = REPO / "parity_tests"
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == suite_modules:
            monkeypatch.delitem(sys.modules, name)
    return pytester


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> SuiteCopy:
    # The inner run is a session of its own: not an xdist worker (syrupy would leave its report to a
    # controller that does not exist) and not configured by the caller's VITPARITY_* variables.
    for name in [n for n in os.environ if n.startswith(("PYTEST_XDIST_", "VITPARITY_"))]:
        monkeypatch.delenv(name)
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy(REPO / name, pytester.path / name)
    shutil.copytree(REPO / "parity_tests", pytester.path / "parity_tests")
    shutil.copytree(GOLDEN, pytester.path / "fixtures" / "golden")
    return SuiteCopy(pytester)
