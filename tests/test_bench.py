"""CPU smoke test of the bench package with its tiny config (`python -m bench --small`), its progress lines, its
FLOP floor rule, its warning for GPU-sized sections on the CPU, and its clean-up when terminated.

The suite-run, scale and suite-scale sections and `python -m bench gpu-check --small` start pytest processes and take about
a minute on a small CPU box; they are run by hand (docs/benchmarks.md), not here (the termination test starts the
suite-run section and stops it in its first pytest process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ["forward", "early-exit", "cross-parity", "attention", "rope", "variants", "overhead", "sharp-parity", "decode"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def test_bench_small_runs_its_sections_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = ENV
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *SECTIONS, "--small", "--device", "cpu", "--repeats", "1", "--warmup", "0",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # progress on stderr: one line per step, counted
    for line in ("[models 1/1] building both models, config small", "[forward 1/4] image-small", "[forward 4/4] video-small",
                 "[early-exit 4/4] video-small", "[cross-parity 4/4] video-small", "[attention 3/3] packed-",
                 "[variants 12/12] video-small", "[overhead files 1/1] writing overhead.mp4", "[overhead 8/8] golden",
                 "[sharp-parity 3/3] video-small", "[decode files 2/2] writing clip-240f-small.mp4",
                 "[decode 4/4] clip-240f-small.mp4: default", "section 9/9: decode"):
        assert f"\n{line}" in f"\n{proc.stderr}", line
    assert "warning" not in proc.stderr  # --small: nothing GPU-sized
    # no FLOP floor on the CPU: said once, no floor column, null in the JSON
    assert proc.stdout.count("no FLOP floor: cpu has no known matrix rate") == 1
    assert "x floor" not in proc.stdout and "floor at" not in proc.stdout and "floor s" not in proc.stdout
    for heading in ("Forward (extraction protocol)", "Early-exit forward vs full hidden states", "Parity hf vs packing", "Parity across attention kernels",
                    "Attention alone", "RoPE check", "Whole forwards per variant", "Suite overhead",
                    "Parity with sharp weights", "Decode of 8 sampled frames", "Normalisation of a context"):
        assert heading in proc.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["device"] == "cpu" and results["sections"] == SECTIONS
    assert results["floor"]["tflops"] is None and results["floor"]["source"].startswith("no FLOP floor: cpu")
    assert all(e["floor_s"] is None and e[side]["x_floor"] is None for e in results["forward"] for side in ("hf", "packing"))
    assert all(entry["x_floor"] is None for entry in results["variants"])
    assert results["machine"]["packed_backends"] == ["sdpa", "flex", "eager"]
    cases = {entry["case"]: entry for entry in results["forward"]}
    assert set(cases) == {"image-small", "video-small"}
    for entry in cases.values():
        assert entry["tokens"] > 0 and entry["flops"] > 0
        for side in ("hf", "packing"):
            assert entry[side]["median_s"] > 0 and entry[side]["peak_gib"] > 0
        assert entry["parity"]["min_cos"] > 0.9999  # float32 on CPU: the two implementations agree
    # every kernel that runs on the CPU was checked against float64, dense and packed, FlexAttention included
    checks = results["attention_check"]
    assert {"packed-sdpa-default", "packed-flex", "packed-eager", "dense-sdpa-default", "dense-flex"} <= set(checks)
    assert all(isinstance(err, float) and err < 1e-5 for err in checks.values()), checks
    assert all("error" not in entry for entry in results["variants"] + results["cross_parity"])
    assert all(p["min_cos"] > 0.9999 for p in results["cross_parity"] + results["sharp_parity"])
    assert results["rope_check"]["path"] == "torch"
    early = results["early_exit"]
    assert {(e["case"], e["model"]) for e in early} == {(c, m) for c in cases for m in ("hf", "packing")}
    for entry in early:  # one kept tensor instead of every layer's (2 layers: 3 hidden states + the output)
        assert entry["bit_identical"]
        assert entry["full"]["kept_bytes"] == 4 * entry["early"]["kept_bytes"] == 4 * entry["tokens"] * 64 * 4
    assert [d["same_pixels"] for d in results["decode"]] == [True, True]
    assert [n["same_values"] for n in results["normalize"]] == [True]  # the gather per frame is the formula, bit for bit


def test_bench_refuses_unknown_sections() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "fowrard", "--small"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "unknown section(s) ['fowrard']" in proc.stderr


LOGIC = """
import json, sys
from pathlib import Path
from bench.common import flop_floor
from bench.runner import cpu_warning, parse
from bench import workloads
from bench.workloads import write_media

def floor(argv):
    opts = parse(argv)
    return [opts.floor_tflops, opts.floor_note]

def media(folder):
    specs = [("a.jpg", 1, 28, 42), ("b.mp4", 3, 28, 42)]
    write_media(folder, specs, label="test")
    (folder / "b.mp4").write_bytes(b"kept")  # an existing file is kept, not written again
    write_media(folder, specs, label="test")
    write_file = workloads._write_file

    def interrupted(cv2, path, frames):  # Ctrl-C once the file is written, before it is renamed
        write_file(cv2, path, frames)
        raise KeyboardInterrupt

    workloads._write_file, stopped = interrupted, False
    try:
        write_media(folder, [("c.mp4", 2, 28, 42)], label="test")
    except KeyboardInterrupt:
        stopped = True
    return {"files": sorted(p.name for p in folder.iterdir()), "b": (folder / "b.mp4").read_bytes().decode(),
            "stopped": stopped}

out = {
    "h100": flop_floor("NVIDIA H100 80GB HBM3", "bfloat16", None), "h200": flop_floor("NVIDIA H200", "float16", None),
    "h100_fp32": flop_floor("NVIDIA H100 80GB HBM3", "float32", None),
    "a100": flop_floor("NVIDIA A100-SXM4-80GB", "bfloat16", None),
    "cpu_small": floor(["forward", "--small", "--device", "cpu"]),
    "cpu_given": floor(["forward", "--small", "--device", "cpu", "--floor-tflops", "2.5"]),
    "warn": {" ".join(argv): cpu_warning(parse(argv)) for argv in (
        ["forward", "--device", "cpu"], ["forward", "attention", "rope", "decode", "--device", "cpu"],
        ["forward", "--device", "cpu", "--small"], ["early-exit", "rope", "decode", "suite-scale", "--device", "cpu"],
        ["--device", "cpu", "--dtype", "bfloat16"])},
    "media": media(Path(sys.argv[1])),
}
try:
    parse(["forward", "--floor-tflops", "0"])
except SystemExit as stop:
    out["zero"] = stop.code
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def logic(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """The bench's rules run without a section, in one process: the FLOP floor (bench.common.flop_floor and
    --floor-tflops), the CPU warning (bench.runner.cpu_warning), and writing media (bench.workloads.write_media).
    Returns what they gave and the process's stderr."""
    proc = subprocess.run([sys.executable, "-c", LOGIC, str(tmp_path_factory.mktemp("media"))], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def test_bench_floor_only_on_a_known_gpu_or_when_given(logic) -> None:
    """A known GPU in bf16 / fp16 gets its rate; the CPU, other GPUs and float32 none, unless --floor-tflops."""
    out, stderr = logic
    assert out["h100"] == [795.0, "FLOP floor at 795.0 TFLOP/s (the bfloat16 matrix rate used for NVIDIA H100 80GB HBM3)"]
    assert out["h200"][0] == 795.0
    assert out["h100_fp32"][0] is None and "not float32" in out["h100_fp32"][1]
    assert out["a100"] == [None, "no FLOP floor: NVIDIA A100-SXM4-80GB has no known matrix rate (known: NVIDIA H100 "
                                 "80GB HBM3, NVIDIA H200); pass --floor-tflops RATE to compare against RATE TFLOP/s"]
    assert out["cpu_small"][0] is None and out["cpu_small"][1].startswith("no FLOP floor: cpu has no known matrix rate")
    assert out["cpu_given"] == [2.5, "FLOP floor at 2.5 TFLOP/s (--floor-tflops)"]
    assert out["zero"] == 2 and "--floor-tflops: must be > 0, got 0" in stderr


def test_bench_warns_for_gpu_sized_sections_on_the_cpu(logic) -> None:
    warn = logic[0]["warn"]
    assert warn["forward --device cpu"].startswith("warning: forward: GPU measurements at real sizes")
    assert "on cpu in float32, config vit-l; their figures are cpu figures" in warn["forward --device cpu"]
    assert "Pass --small" in warn["forward --device cpu"]
    assert warn["forward attention rope decode --device cpu"].startswith("warning: forward, attention: GPU")
    assert warn["forward --device cpu --small"] is None
    assert warn["early-exit rope decode suite-scale --device cpu"] is None  # CPU figures by design
    assert warn["--device cpu --dtype bfloat16"].startswith(  # the default sections
        "warning: forward, cross-parity, attention, variants, overhead, suite, sharp-parity: GPU")
    assert "on cpu in bfloat16" in warn["--device cpu --dtype bfloat16"]


def test_bench_media_are_written_whole_or_not_at_all(logic) -> None:
    """An existing file is kept; a file whose writing is interrupted leaves nothing behind (no partial file)."""
    out, stderr = logic
    assert out["media"] == {"files": ["a.jpg", "b.mp4"], "b": "kept", "stopped": True}
    assert "[test files 2/2] b.mp4: kept (already there)" in stderr
    assert "[test files 1/1] writing c.mp4: 2 frame(s) of 42x28" in stderr


def test_bench_given_floor_is_printed_and_recorded(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "forward", "--small", "--device", "cpu", "--repeats", "1", "--warmup", "0",
         "--floor-tflops", "0.001", "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FLOP floor at 0.001 TFLOP/s (--floor-tflops)" in proc.stdout and "floor at 0.001 TFLOP/s;" in proc.stdout
    assert "floor s  x floor" in proc.stdout
    results = json.loads(out.read_text())
    assert results["floor"]["tflops"] == 0.001
    for entry in results["forward"]:
        assert entry["floor_s"] == pytest.approx(entry["flops"] / 1e9, rel=1e-12)
        for side in ("hf", "packing"):
            assert entry[side]["x_floor"] == pytest.approx(entry[side]["median_s"] / entry["floor_s"], rel=1e-12)


def _marked_pids(marker: str) -> list[int]:
    """Processes of this user whose environment holds `marker` (children inherit it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find child processes")
def test_bench_terminated_ends_its_suite_process_and_removes_its_temp_folder(tmp_path: Path) -> None:
    """SIGTERM while the suite section's first pytest process runs: exit 143, that process and its children gone,
    no vitparity-bench-* folder left in TMPDIR."""
    tmp, marker = tmp_path / "tmp", f"BENCH_TEST_MARK={uuid.uuid4().hex}"
    tmp.mkdir()
    env = {**ENV, "TMPDIR": str(tmp), marker.split("=")[0]: marker.split("=")[1]}
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench", "suite", "--small", "--device", "cpu"], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not (children := [p for p in _marked_pids(marker) if p != proc.pid]) or \
                    "cold run of the suite" not in stderr.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
                time.sleep(0.2)
            assert list(tmp.glob("vitparity-bench-*"))  # the folder exists while it runs
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == 143, stderr.read_text()[-3000:]  # exit: torch libraries unload slowly
        finally:
            if proc.poll() is None:
                proc.kill()
    text = stderr.read_text()
    assert "terminated (SIGTERM): child processes ended, temporary folder removed" in text
    assert not list(tmp.glob("vitparity-bench-*"))
    assert _marked_pids(marker) == [], f"still running after the bench ended: {children}"
