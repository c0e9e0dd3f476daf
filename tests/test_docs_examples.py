"""Every command in the documentation's `sh` blocks (README.md, fixtures/README.md, docs/*.md) either runs here as
written, with its placeholders (`/ckpt/...`, `/data/...`, `A`, `B`, ...) replaced by the built-in models and copies
of the bundled media, and ends as the docs say, or names the test or CI step that runs it. A new example without an
entry in EXAMPLES, or an entry whose example is gone, fails `test_every_documented_command_has_an_expectation`."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vitparity.builtin import BUILTIN_HF, BUILTIN_MEDIA, BUILTIN_PACKING
from vitparity.cli import main
from vitparity.gate import gate_args

from conftest import REPO
from remote import release_checkpoint
from test_hub import cache_builtin_models

DOCS = (REPO / "README.md", REPO / "fixtures" / "README.md", *sorted((REPO / "docs").glob("*.md")))
MISSING_GOLDEN = "missing goldens: "  # the summary's line that counts them apart (docs/missing_goldens.md)


@dataclass(frozen=True)
class Example:
    """How a documented command is checked: `run` (suite, cli, tox or script) with `replace` (placeholder ->
    value here; `{tmp}` is the test's folder) and the exit status and text the docs promise, or `elsewhere`."""

    run: str = ""
    replace: dict[str, str] = field(default_factory=dict)
    ret: int = 0
    says: str = ""
    elsewhere: str = ""


CKPT = {"/ckpt/onevision-encoder-large": "{tmp}/ckpt/hf", "/ckpt/onevision-encoder-large-packing": "{tmp}/ckpt/packing"}
MEDIA = {"/data/more_media": "{tmp}/more_media", "/data/goldens": "{tmp}/goldens"}
RELEASE = {"/ckpt/release": "{tmp}/ckpt/release", "/ckpt/release-packing": "{tmp}/ckpt/release-packing"}
FAULTS = "tests/test_faults.py runs these suite runs on every planted fault (docs/detection.md's table)"
BENCH = ("tests/test_bench.py runs every section with --small on the CPU and --help; full sizes are GPU "
         "measurements (docs/benchmarks.md)")
EXAMPLES: dict[str, Example] = {
    # README: set-up (CI's .ci/run runs exactly these two lines)
    'python -m pip install -e ".[test]" && python -m pytest': Example(elsewhere=".ci/run"),
    "python -m pytest tests -n auto": Example(elsewhere=".ci/run"),
    # README: running the suite
    "pytest": Example("suite"),
    "pytest -k video": Example("suite"),
    'pytest -m "not golden"': Example("suite"),
    "pytest -n 4": Example(elsewhere="tests/test_suite_work.py and tests/test_suite.py run the suite under -n 2 and "
                                     "-n 3 (the same forwards as serial)"),
    "pytest --hf-model=/ckpt/onevision-encoder-large --packing-model=/ckpt/onevision-encoder-large-packing "
    "--trust-remote-code --device cuda --dtype bfloat16 --media=/data/more_media":
        Example("suite", {**CKPT, **MEDIA, "cuda": "cpu"}, ret=1, says=MISSING_GOLDEN),
    "pytest --hf-model=org/onevision-encoder-large@v1.0 --packing-model=org/onevision-encoder-large-packing@v1.0 "
    "--trust-remote-code":
        Example("suite"),
    'pytest -m "not golden" --media=/data/more_media': Example("suite", MEDIA),
    'pytest -m "not golden" --no-bundled-media --media=/data/more_media:/data/clip.mp4':
        Example("suite", {"/data/more_media:/data/clip.mp4": "{tmp}/more_media:{tmp}/clip.mp4"},
                # 3 files (espresso.jpg, espresso_zoom.mp4, clip.mp4) and the 2 videos' codec-style cases: 5 cases,
                # each alone and packed (10), last_hidden_state and pooler_output (10), the 4 video and codec-style
                # cases' explicit positions against context and packing (8), one codec case's token order (3), each
                # case's row of an hf batch (5), the pack called grid_thw only (the 3 images and videos)
                says="39 comparisons, 39 passed"),
    'pytest -m "codec and not golden"': Example("suite"),
    'pytest -m "not golden and not codec"': Example("suite"),
    "pytest --golden-dir=/data/goldens --snapshot-update --media=/data/more_media --align=resize --scales=0.5":
        Example("suite", MEDIA, says="snapshots generated"),
    "pytest --golden-dir=/data/goldens --media=/data/more_media --align=resize --scales=0.5": Example("suite", MEDIA),
    **dict.fromkeys(["pytest --snapshot-update", "pytest --regenerate-goldens"], Example(
        elsewhere="tests/test_suite.py (test_regenerate_rewrites_every_golden_and_orphans_fail_the_full_run, "
                  "test_broken_pair_is_never_blessed) and tests/test_goldens.py")),
    # README: tox (each environment exists and runs what the README says)
    "tox -e regen": Example("tox", says="--regenerate-goldens"),
    "tox -e tests": Example("tox", says="pytest tests"),
    "tox -e suite": Example("tox", says="pytest"),
    "tox -e gpu": Example("tox", says="VITPARITY_DEVICE = cuda"),
    # README: commands
    "vitparity extract --hf_model_path A --packing_model_path B --image1 1.jpg --image2 2.jpg --video1 1.mp4 "
    "--video2 2.mp4 --num_frames 8 --output_dir ./features": Example("cli", {"A": str(BUILTIN_HF),
                                                                              "B": str(BUILTIN_PACKING)}),
    "vitparity extract --hf-model A --packing-model B --image1 1.jpg --image2 2.jpg --video1 1.mp4 "
    "--video2 2.mp4 --num-frames 8 --output-dir ./features": Example("cli", {"A": str(BUILTIN_HF),
                                                                              "B": str(BUILTIN_PACKING)}),
    "vitparity extract --root ./media --output-dir ./features": Example("cli"),
    "vitparity extract --root ./media --codec --output-dir ./codec": Example("cli"),
    "vitparity extract --images a.jpg b.png c.jpg --videos d.mp4 --output-dir ./features": Example("cli"),
    "vitparity verify --features-dir ./features --threshold 0.99": Example("cli"),
    "vitparity verify --features_dir ./features --threshold 0.99": Example("cli"),
    "vitparity convert HF_DIR OUT_DIR": Example("cli", {"HF_DIR": str(BUILTIN_HF), "OUT_DIR": "{tmp}/converted"}),
    "vitparity report-junit junit-shard-1.xml junit-shard-2.xml": Example("cli"),
    # README: use it in your release repository
    **dict.fromkeys([
        "python -m pip install -c constraints/gate-lock.txt dist/vitparity-0.1.0-py3-none-any.whl",
        "vitparity gate -k coffee_small",
    ], Example(elsewhere="tests/test_packaging.py (the wheel installed in a fresh venv runs the gate from a folder "
                         "of copied media and goldens; a bare folder gates on the built-in goldens and refuses to "
                         "rewrite them) and tests/test_action.py (the action's install with the lock, and its gate)")),
    # on checkpoints that ship their own code (release-format), from a folder that holds only media and goldens; the
    # second line with -n 2 (this machine's cores) for -n 4
    "vitparity gate --hf-model /ckpt/release --packing-model /ckpt/release-packing --trust-remote-code "
    "--no-bundled-media --media=media --golden-dir=goldens --regenerate-goldens":
        Example("gate", RELEASE, says="6 snapshots generated"),
    "vitparity gate --hf-model /ckpt/release --packing-model /ckpt/release-packing --trust-remote-code "
    "--no-bundled-media --media=media --golden-dir=goldens -n 4":
        Example("gate", {**RELEASE, "4": "2"}, says="6 snapshots passed"),
    # fixtures/README.md
    'python -m pip install -e ".[media]"': Example(elsewhere="pyproject.toml's media extra (checked below)"),
    "python fixtures/make_media.py": Example(elsewhere="the --out DIR form below (it would rewrite fixtures/media)"),
    "python fixtures/make_media.py --out DIR": Example("script", {"DIR": "{tmp}/made"}),
    # README: goldens across releases
    "pytest -m golden --golden-dir=/data/goldens-v2 --snapshot-update --golden-baseline=/data/v1/fixtures/golden":
        Example("suite", {"/data/goldens-v2": "{tmp}/goldens-v2", "/data/v1/fixtures/golden": "fixtures/golden"},
                says="vitparity baseline drift"),
    **dict.fromkeys([
        "vitparity golden-diff HEAD~1:fixtures/golden fixtures/golden", "vitparity golden-diff OLD NEW",
        "vitparity golden-show GOLDEN.npz", 'git config diff.vitparity-golden.textconv "vitparity golden-show"',
        "git diff HEAD~1 -- fixtures/golden",
    ], Example(elsewhere="tests/test_goldens.py (golden-diff of two folders and of git revisions, the textconv "
                         "driver through git diff)")),
    # docs/release_tool.md: needs the release's repository, its stand-ins and transformers 4.x
    **dict.fromkeys([
        "PYTHONPATH=/tmp/tf4:$SHIMS:$RELEASE python extract_features_fp32.py --hf_model_path ckpt/hf "
        "--packing_model_path ckpt/packing --root $RELEASE/model_factory/images --output_dir feat_author",
        "vitparity extract --hf_model_path ckpt/hf --packing_model_path ckpt/packing --root "
        "$RELEASE/model_factory/images --output_dir feat_vp --align resize --device cpu --dtype float32",
        "PYTHONPATH=$SHIMS vitparity extract --hf_model_path ckpt_remote/hf --packing_model_path ckpt_remote/packing "
        "--root $RELEASE/model_factory/images --output_dir feat_vp_remote --align resize --device cpu --dtype float32 "
        "--trust_remote_code",
    ], Example(elsewhere="run by hand for docs/release_tool.md; the same paths on this project's files: "
                         "tests/test_align_resize.py, tests/test_temporal_context.py, tests/test_buffers.py")),
    "python -m bench suite-plan --device cpu": Example(elsewhere="run by hand for docs/benchmarks.md (suite runs of "
                                                               "minutes); not run by the tests"),
    # docs/benchmarks.md
    **dict.fromkeys([
        "python -m bench --help", "python -m bench --small", "python -m bench forward --json out.json",
        "python -m bench attention variants", "python -m bench suite", "python -m bench scale --scale-videos 100",
        "python -m bench decode --repeats 5", "python -m bench early-exit --config vit-l",
        "python -m bench suite-scale --device cpu", "bench/gpu_check.sh gpu-results",
        "bench/gpu_check.sh /tmp/check --small",
    ], Example(elsewhere=BENCH)),
    "bench/start_times.sh 3": Example(elsewhere="run by hand for docs/benchmarks.md (wall times, never asserted); "
                                          "tests/test_cli_imports.py checks that its commands import neither torch "
                                          "nor transformers"),
    "python -m bench gpu-suite --out gpu-suite": Example(elsewhere="run by hand on a GPU for docs/benchmarks.md (its "
                                                                   "--small form on the CPU: minutes of suite runs)"),
    # docs/detection.md
    **dict.fromkeys([
        "time python -m pytest tests/test_faults.py -n 2", "python -m pytest tests/test_faults.py -s -k qk_swapped",
        "VITPARITY_FAULTS_OUT=/tmp/detection python -m pytest tests/test_faults.py -n 2",
        "python -m tests.faults.detection /tmp/detection",
        "python -c \"import sys; sys.path.insert(0, 'tests'); from faults import build_variant; "
        "print(build_variant('rope_half_split', '/tmp/variants'))\"",
        "HF_MODULES_CACHE=/tmp/hf_modules python -m pytest parity_tests --packing-model=/tmp/variants/rope_half_split "
        "--trust-remote-code --dtype=bfloat16 --device=cpu --report-dir=/tmp/report",
    ], Example(elsewhere=FAULTS)),
    **dict.fromkeys([
        "python -m bench.precision_noise --config vit-l --dtypes float32,bfloat16",
        "python -m bench.precision_noise --config vit-l --height 448 --width 448 --seed 1",
        "python -m bench.precision_noise --config small --height 56 --width 70",
    ], Example(elsewhere="tests/test_precision.py (test_noise_measurement_separates_faults_from_numerics) runs it on "
                         "the small config; the ViT-L figures take minutes on the CPU")),
}


def documented_commands() -> list[str]:
    """Each command of every `sh` block, continuation lines joined and the trailing comment dropped."""
    commands = []
    for path in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = "" if line.lstrip().startswith("#") else re.sub(r"\s+#\s.*$", "", line).strip()
                if command:
                    commands.append(" ".join(command.split()))
    return commands


def by_kind(kind: str) -> list[str]:
    return [command for command, example in EXAMPLES.items() if example.run == kind]


def args_of(command: str, tmp: Path, program: str) -> list[str]:
    """The command's arguments after `program`, each placeholder (a whole argument or an option's value) replaced."""
    words = shlex.split(command)
    assert words[0] == program, command
    replace = {key: value.format(tmp=tmp) for key, value in EXAMPLES[command].replace.items()}
    out = []
    for word in words[1:]:
        option, equals, value = word.partition("=")
        out.append(replace.get(word) or (f"{option}={replace[value]}" if equals and value in replace else word))
    return out


def test_every_documented_command_has_an_expectation() -> None:
    documented = documented_commands()
    assert sorted(set(documented) - set(EXAMPLES)) == [], "documented commands without an entry in EXAMPLES"
    assert sorted(set(EXAMPLES) - set(documented)) == [], "entries in EXAMPLES no document shows any more"


def more_media(folder: Path) -> Path:
    """A media folder of one's own: an image and a video that the bundled media do not name."""
    folder.mkdir(parents=True)
    shutil.copy(BUILTIN_MEDIA / "coffee_small.jpg", folder / "espresso.jpg")
    shutil.copy(BUILTIN_MEDIA / "coffee_zoom.mp4", folder / "espresso_zoom.mp4")
    return folder


@pytest.mark.usefixtures("isolated")
def test_suite_examples_end_as_documented(suite, tmp_path, monkeypatch) -> None:
    """In the order the README shows them: the golden-folder workflow writes before it checks. The real-checkpoint
    examples (folders and hub ids) run checkpoints that ship their own code, as a release's do."""
    more_media(tmp_path / "more_media")
    shutil.copy(BUILTIN_MEDIA / "rocket_tilt.mp4", tmp_path / "clip.mp4")
    release = {side: release_checkpoint(side, tmp_path / "ckpt" / side) for side in ("hf", "packing")}
    cache_builtin_models(tmp_path / "hf-home", monkeypatch, refs=("main", "v1.0"), sources=release,
                         repos={"hf": "org/onevision-encoder-large", "packing": "org/onevision-encoder-large-packing"})
    committed = suite.goldens()
    for command in by_kind("suite"):
        example = EXAMPLES[command]
        result = suite.run(*args_of(command, tmp_path, "pytest"))
        out = result.stdout.str() + result.stderr.str()
        assert result.ret == example.ret, f"{command}\n{out[-3000:]}"
        assert example.says in out, command
        assert "Traceback" not in out and "INTERNALERROR" not in out, command
    assert suite.goldens() == committed, "an example wrote into the committed golden folder"
    own = sorted(p.name for p in (tmp_path / "goldens").rglob("*.npz"))  # the bundled + 2 more media, at 0.5 only
    bundled = len([p for p in BUILTIN_MEDIA.iterdir() if p.suffix in (".jpg", ".png", ".mp4")])
    assert len(own) == 2 * (bundled + 2) and all("@0.5-" in name for name in own)
    assert "test_golden[video-espresso_zoom.mp4@0.5-packing].npz" in own


@pytest.mark.usefixtures("isolated")
def test_gate_examples_gate_the_release_code(pytester, tmp_path, monkeypatch) -> None:
    """The release repository's lines, in order, from a folder holding only its media, on checkpoints that ship their
    own code: the regeneration writes the goldens of those media alone (both models), and the gate passes on them
    with the checkpoints' code, the reference and the whole outputs checked."""
    for name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")]:  # the runs below are sessions of their own
        monkeypatch.delenv(name)
    release_checkpoint("hf", tmp_path / "ckpt" / "release")
    release_checkpoint("packing", tmp_path / "ckpt" / "release-packing")
    more_media(pytester.path / "media")
    for command in by_kind("gate"):
        example = EXAMPLES[command]
        gate, *args = args_of(command, tmp_path, "vitparity")
        assert gate == "gate", command
        result = pytester.runpytest_inprocess(*gate_args(["-p", "no:cacheprovider", *args]))
        out = result.stdout.str() + result.stderr.str()
        assert result.ret == example.ret, f"{command}\n{out[-3000:]}"
        assert example.says in out, f"{command}\n{out[-3000:]}"
        assert "hf: the checkpoint's own code" in out and "reference/packing/" in out, out[-3000:]
        assert "coffee_small" not in out, "the bundled media ran"
    written = sorted(p.name for p in (pytester.path / "goldens").rglob("*.npz"))
    assert len(written) == 6 and all("espresso" in name for name in written), written


def test_cli_examples_end_as_documented(suite, tmp_path, monkeypatch, capsys) -> None:
    """extract (three input forms), verify, convert and report-junit, each in a folder holding what it names."""
    names = {"1.jpg": "coffee_small.jpg", "2.jpg": "astronaut.jpg", "1.mp4": "coffee_zoom.mp4",
             "2.mp4": "chelsea_pan.mp4", "a.jpg": "coffee_small.jpg", "b.png": "chelsea_cat.png",
             "c.jpg": "rocket_portrait.jpg", "d.mp4": "coffee_zoom.mp4"}
    for index in (1, 2):  # what report-junit reads: the suite's shards written with --junitxml
        assert suite.run("-m", "not golden", f"--shard={index}/2", f"--junitxml=junit-shard-{index}.xml").ret == 0
    for command in by_kind("cli"):
        folder = suite.path if "report-junit" in command else tmp_path / (
            "root" if "--root" in command else "listed" if "--images" in command or "verify" in command else "numbered")
        folder.mkdir(exist_ok=True)
        for name, source in names.items():
            if "--root" in command and name[0].isdigit():  # the README: <root>/1.jpg 2.jpg 1.mp4 2.mp4
                target = folder / "media" / name
            elif name in command:
                target = folder / name
            else:
                continue
            target.parent.mkdir(exist_ok=True)
            shutil.copy(BUILTIN_MEDIA / source, target)
        monkeypatch.chdir(folder)
        code = main(args_of(command, tmp_path, "vitparity"))
        out, err = capsys.readouterr()
        assert code == EXAMPLES[command].ret, f"{command}\n{out[-2000:]}\n{err[-2000:]}"
    assert (tmp_path / "converted" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", by_kind("tox"))
def test_tox_examples_name_existing_environments(command: str) -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO / "tox.ini")
    env = f"testenv:{command.split()[-1]}"
    assert tox.has_section(env), command
    assert EXAMPLES[command].says in tox[env].get("commands", "") + tox[env].get("setenv", ""), command


def test_media_script_example(tmp_path: Path) -> None:
    """`make_media.py --out DIR` writes the media where scikit-image (the media extra) is installed, and otherwise
    says which extra to install."""
    extra = re.search(r"^media = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)
    assert extra and "scikit-image" in extra.group(1)
    command, = by_kind("script")
    proc = subprocess.run([sys.executable, *args_of(command, tmp_path, "python")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    try:
        import skimage  # noqa: F401
    except ImportError:
        assert proc.returncode == 1 and 'python -m pip install -e ".[media]"' in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in (tmp_path / "made").iterdir()) == sorted(
            p.name for p in BUILTIN_MEDIA.iterdir())
