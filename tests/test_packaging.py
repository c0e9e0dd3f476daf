"""vitparity as a dependency: its wheel runs the gate from a folder of its own, and once installed it leaves another
project's pytest as it was (no option of the suite outside the suite's own runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from vitparity.builtin import BUILTIN_MEDIA
from vitparity.gate import gate_args

REPO = Path(__file__).resolve().parent.parent
# A machine-learning project's conftest: options named as the suite's are (the clash the suite must never cause).
FOREIGN_CONFTEST = '''
def pytest_addoption(parser):
    parser.addoption("--device", default="cpu")
    parser.addoption("--dtype", default="float32")


def pytest_report_header(config):
    return f"foreign: {config.getoption('device')} {config.getoption('dtype')}"
'''
FOREIGN_TEST = '''
def test_own_options(pytestconfig):
    assert (pytestconfig.getoption("device"), pytestconfig.getoption("dtype")) == ("cuda:7", "int8")
'''


def _clean_env() -> dict[str, str]:
    """This environment without the caller's xdist worker and VITPARITY_* variables or a PYTHONPATH."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTEST_", "VITPARITY_")) and k not in ("PYTHONPATH", "COV_CORE_SOURCE")}


def _foreign_project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conftest.py").write_text(FOREIGN_CONFTEST)
    (folder / "test_foreign.py").write_text(FOREIGN_TEST)
    return folder


def _foreign_run(python: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "--device", "cuda:7", "--dtype=int8",
                           "-p", "no:randomly"], cwd=folder, env=_clean_env(), capture_output=True, text=True)


def test_another_projects_device_and_dtype_options_are_its_own(tmp_path: Path) -> None:
    """vitparity installed here (its pytest11 entry point loads): a project whose conftest adds --device and --dtype
    runs its tests, and its --help shows none of the suite's options."""
    folder = _foreign_project(tmp_path / "other")
    result = _foreign_run(sys.executable, folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "foreign: cuda:7 int8" in result.stdout and "1 passed" in result.stdout
    helped = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=folder, env=_clean_env(),
                            capture_output=True, text=True)
    assert "--hf-model" not in helped.stdout and "vitparity" not in helped.stdout


def test_the_gate_joins_the_suites_options_and_passes_pytests_through() -> None:
    args = gate_args(["-k", "video", "-n", "4", "--hf-model", "/ckpt/a b", "--packing-model=/ckpt/p", "-x"])
    assert args == ["-p", "vitparity.pytest_plugin", "--noconftest", "-k", "video", "-n", "4",
                    "--hf-model=/ckpt/a b", "--packing-model=/ckpt/p", "-x", "--pyargs", "vitparity.parity_tests"]


SOURCES = ("pyproject.toml", "README.md", "vitparity", "parity_tests", "fixtures")  # what the build reads


def _build_wheel(out: Path) -> Path:
    """The project's wheel, built with the setuptools already installed (no download) from a copy of the files the
    build reads (a build writes build/ and *.egg-info beside its sources: never into the checkout)."""
    source = out / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(source)], check=True, env=_clean_env(), cwd=out)
    (wheel,) = out.glob("vitparity-*.whl")
    return wheel


def _venv_with_wheel(folder: Path, wheel: Path) -> Path:
    """A fresh venv (no pip) holding only the wheel; its dependencies (torch and the rest) are reused from this
    environment through a .pth line naming this environment's site-packages (plain path, its own .pth files, such
    as an editable install's finder, are not run). Returns the venv's python."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, env=_clean_env(), cwd=folder)
    return python


def test_the_wheel_runs_the_gate_from_a_folder_of_its_own(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv, and run the gate (the `vitparity` script) from a folder that
    holds only copies of goldens and media and a foreign conftest: no checkout on the path."""
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("vitparity/parity_tests/test_parity.py", "vitparity/parity_tests/test_golden.py",
                   "vitparity/fixtures/models/tiny-onevision-encoder/model.safetensors",
                   "vitparity/fixtures/models/tiny-onevision-encoder-packing/config.json",
                   "vitparity/fixtures/media/coffee_small.jpg", "vitparity/models/modeling_onevision_encoder.py"):
        assert member in names, member
    assert any(n.startswith("vitparity/fixtures/golden/") and n.endswith(".npz") for n in names)
    python = _venv_with_wheel(tmp_path / "venv", wheel)
    release = _foreign_project(tmp_path / "release")  # the release repository: its own conftest, goldens, media
    shutil.copytree(REPO / "fixtures" / "golden", release / "goldens")
    (release / "media").mkdir()
    shutil.copy(BUILTIN_MEDIA / "coffee_small.jpg", release / "media" / "espresso.jpg")
    where = subprocess.run([str(python), "-c", "import vitparity; print(vitparity.__file__)"], cwd=release,
                           env=_clean_env(), capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv")), where
    script = str(tmp_path / "venv" / "bin" / "vitparity")
    gate = subprocess.run([script, "gate", "-p", "no:randomly", "-p", "no:cacheprovider", "--golden-dir", "goldens",
                           "--media=media", "-k", "coffee_small or (espresso and not golden)"],
                          cwd=release, env=_clean_env(), capture_output=True, text=True)
    out = gate.stdout
    assert gate.returncode == 0, out[-4000:] + gate.stderr[-3000:]
    assert str(tmp_path / "venv") in out and "fixtures/models/tiny-onevision-encoder" in out  # the wheel's models
    assert "image-espresso.jpg" in out and "image-coffee_small.jpg" in out
    assert "2 snapshots passed" in out and "failed" not in out.split("snapshot report summary")[-1]
    own = _foreign_run(str(python), release)  # the release repository's own tests, beside the installed wheel
    assert own.returncode == 0 and "1 passed" in own.stdout, own.stdout[-3000:]


def test_a_bare_folder_gates_on_the_built_in_goldens_and_never_rewrites_them(pytester, monkeypatch) -> None:
    """No ini file, no --golden-dir: the built-in models are checked against their built-in goldens; an update
    there is refused (they are package data) before anything runs. In this process: the gate's command line."""
    for name in [n for n in os.environ if n.startswith(("PYTEST_XDIST_", "VITPARITY_"))]:
        monkeypatch.delenv(name)
    gate = pytester.runpytest_inprocess(*gate_args(["-p", "no:cacheprovider", "-k", "coffee_small and golden"]))
    assert gate.ret == 0 and "2 snapshots passed" in gate.stdout.str(), gate.stdout.str()[-3000:]
    update = pytester.runpytest_inprocess(*gate_args(["-p", "no:cacheprovider", "--regenerate-goldens"]))
    assert update.ret == pytest.ExitCode.USAGE_ERROR
    assert "--golden-dir" in update.stderr.str() and "package data" in update.stderr.str()
    assert list(pytester.path.iterdir()) == []


def _pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a constraints file (names normalised)."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in (*project["dependencies"], *project["optional-dependencies"]["test"])]


def test_every_floor_is_the_version_the_lowest_ci_step_installs() -> None:
    """Each direct dependency's lower bound is its pin in constraints/lowest.txt (what .ci/lowest runs on)."""
    lowest = _pins(REPO / "constraints" / "lowest.txt")
    floors = {}
    for requirement in _requirements():
        (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        floors[canonicalize_name(requirement.name)] = floor
    assert floors.keys() == lowest.keys()
    for name, floor in floors.items():
        assert Version(lowest[name]) == Version(floor), f"{name}: floor {floor}, lowest.txt {lowest[name]}"


def test_the_gate_lock_pins_every_dependency_inside_its_range() -> None:
    lock = _pins(REPO / "constraints" / "gate-lock.txt")
    for requirement in _requirements():
        version = lock.get(canonicalize_name(requirement.name))
        assert version is not None and requirement.specifier.contains(version), (requirement, version)
