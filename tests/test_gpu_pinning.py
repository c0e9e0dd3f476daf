"""Each xdist worker's GPU: pinned from the settings in pytest_configure, never at import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vitparity.gpu_pinning import pin_xdist_worker_gpu


@pytest.mark.parametrize("requested, pinned", [("auto", "5"), ("cuda", "5"), ("cuda:1", None), ("cpu", None)])
def test_only_a_device_without_an_index_is_pinned(monkeypatch, requested, pinned) -> None:
    """Worker gw1 of a caller that shows GPUs 3 and 5: `auto` / `cuda` take the worker's own (5); `--device=cuda:1`
    runs every worker on the GPU asked for (the caller's list is left as it is, so cuda:1 exists)."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert pin_xdist_worker_gpu(requested) == pinned
    assert os.environ["CUDA_VISIBLE_DEVICES"] == (pinned or "3,5")


def test_outside_xdist_nothing_is_pinned(monkeypatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert pin_xdist_worker_gpu("auto") is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


def test_importing_the_plugin_changes_no_process_state() -> None:
    code = ("import os, torch; flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32); "
            "import vitparity.pytest_plugin; "
            "print(os.environ['CUDA_VISIBLE_DEVICES'], flags == (torch.backends.cuda.matmul.allow_tf32, "
            "torch.backends.cudnn.allow_tf32))")
    env = {**os.environ, "PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "3,5"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["3,5", "True"]
