"""Fixtures that let a test load checkpoint code (remote code) without touching the user's module cache or
seeing another run's modules. Import them into a test module: `from faults.isolation import isolated, modules_cache`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import transformers.dynamic_module_utils


@pytest.fixture(scope="session")
def modules_cache(tmp_path_factory) -> Path:
    """Where transformers copies the variants' checkpoint code (HF_MODULES_CACHE) instead of the user's cache."""
    return tmp_path_factory.mktemp("hf_modules")


def _is_remote_code_module(name: str) -> bool:
    return name == "transformers_modules" or name.startswith("transformers_modules.")


@pytest.fixture
def isolated(monkeypatch, modules_cache: Path):
    """No suite option from the environment; checkpoint code copied to and imported from a tmp cache only.

    transformers imports checkpoint code as `transformers_modules.*` from HF_MODULES_CACHE (a constant read at
    import): point it at tmp, hide any such modules imported before, and drop the ones imported here afterwards.
    """
    for name in list(os.environ):
        if name.startswith("VITPARITY_") or name == "PYTEST_ADDOPTS":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_MODULES_CACHE", str(modules_cache))
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(modules_cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [name for name in sys.modules if _is_remote_code_module(name)]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [name for name in sys.modules if _is_remote_code_module(name)]:
        del sys.modules[name]
