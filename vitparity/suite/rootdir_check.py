"""The `pytest11` entry point: one hook, no option, nothing heavy imported (it is loaded by every pytest run in an
environment where vitparity is installed, and changes nothing there).

`pytest --hf-model /ckpt/x` written with a space: pytest picks its rootdir and ini file from `/ckpt/x` before the
suite's plugin (and its options) load, so the run would lose the repository's ini file and conftest. Only the
suite's own path options are looked at (names no other project is expected to use): that case is a usage error
that says what to type.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

SUITE_PATHS = ("--hf-model", "--packing-model", "--golden-dir", "--golden-baseline")


def _separate_suite_paths(args: list[str], here: Path) -> list[str]:
    """Existing paths written as the separate value of one of the suite's own path options."""
    return [args[i + 1] for i in range(len(args) - 1) if args[i] in SUITE_PATHS and (here / args[i + 1]).exists()]


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """A suite path option written `--hf-model /ckpt/x` that cost pytest the ini file of the current folder: a usage
    error that names the paths and the command to type instead."""
    invocation = early_config.invocation_params
    typed = [str(arg) for arg in invocation.args]
    here, inipath, chosen = Path(invocation.dir), early_config.inipath, early_config.known_args_namespace
    if chosen.inifilename or chosen.rootdir:  # -c / --rootdir given: pytest did not guess from the paths
        return
    separate = _separate_suite_paths(typed, here)  # what pytest took for test paths
    if separate and (inipath is None or inipath.parent not in (here, *here.parents)):
        from .options import join_values  # only now: an early import would keep pytest from rewriting the plugin

        command, _ = join_values(typed)
        raise pytest.UsageError(
            f"pytest took {', '.join(separate)} for a test path and set its rootdir to {early_config.rootpath} "
            f"(config file: {inipath}) before it knew the suite's options; type: pytest {shlex.join(command)}"
        )
