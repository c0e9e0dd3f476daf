"""CPU smoke test of the real-size benchmark script with its tiny config (bench/bench_forward.py --small)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_forward.py"


def test_bench_small_runs_every_section_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--small", "--device", "cpu", "--repeats", "1", "--warmup", "0",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for heading in ("Forward (extraction protocol)", "Parity hf vs packing", "Attention alone",
                    "Suite overhead", "Whole parity run", "Parity with sharp weights"):
        assert heading in proc.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["device"] == "cpu"
    cases = {entry["case"]: entry for entry in results["forward"]}
    assert set(cases) == {"image-small", "video-small"}
    for entry in cases.values():
        assert entry["tokens"] > 0 and entry["flops"] > 0
        for side in ("hf", "packing"):
            assert entry[side]["median_s"] > 0
        assert entry["parity"]["min_cos"] > 0.9999  # float32 on CPU: the two implementations agree
    assert all(isinstance(err, float) and err < 1e-5 for err in results["attention_check"].values())
    run = results["parity_run"]
    assert [case["tokens"] for case in run["cases"]] == [20, 20, 96, 96]
    assert all(case["min_cos"] > 0.9999 for case in run["cases"])


def test_bench_decode_small_runs_and_both_modes_agree() -> None:
    proc = subprocess.run([sys.executable, str(BENCH.parent / "bench_decode.py"), "--small", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("clip-")]
    assert [row[0] for row in rows] == ["clip-48f-small.mp4", "clip-240f-small.mp4"]
    assert all(row[-1] == "yes" and float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
