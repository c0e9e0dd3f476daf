"""`vitparity gate [PYTEST ARGS...]`: the parity suite as installed, run from any folder.

The installed parity tests (`vitparity.parity_tests`, the repository's parity_tests/) run with the suite's plugin;
every argument is pytest's or the suite's (`-k video -n 4 --hf-model=/ckpt/x`). The suite's options may be written
with a space (`--hf-model /ckpt/x`): the gate joins them before pytest picks its rootdir. No conftest.py is loaded,
so a release repository's own conftest (and its options, `--device` or `--dtype` say) never meets the suite's; the
folder's ini file still configures the suite (`vitparity_*` keys, see `pytest --help`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from .suite.options import join_values

PLUGIN = "vitparity.pytest_plugin"
TESTS = "vitparity.parity_tests"


def gate_args(args: Sequence[str]) -> list[str]:
    """The pytest command line of a gate run with the user's `args` (passed through, suite options joined)."""
    joined, _ = join_values([str(arg) for arg in args])
    return ["-p", PLUGIN, "--noconftest", *joined, "--pyargs", TESTS]


def run_gate(args: Sequence[str]) -> int:
    """Run the gate in a pytest process of its own (nothing this command imported is seen by pytest's assertion
    rewriting); returns pytest's exit status."""
    return subprocess.run([sys.executable, "-m", "pytest", *gate_args(args)]).returncode
