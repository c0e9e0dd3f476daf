"""CPU smoke test of the bench package with its tiny config (`python -m bench --small`).

The suite-run, scale and suite-scale sections and `python -m bench gpu-check --small` start pytest processes and take about
a minute on a small CPU box; they are run by hand (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ["forward", "early-exit", "cross-parity", "attention", "rope", "variants", "overhead", "sharp-parity", "decode"]


def test_bench_small_runs_its_sections_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *SECTIONS, "--small", "--device", "cpu", "--repeats", "1", "--warmup", "0",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for heading in ("Forward (extraction protocol)", "Early-exit forward vs full hidden states", "Parity hf vs packing", "Parity across attention kernels",
                    "Attention alone", "RoPE check", "Whole forwards per variant", "Suite overhead",
                    "Parity with sharp weights", "Decode of 8 sampled frames"):
        assert heading in proc.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["device"] == "cpu" and results["sections"] == SECTIONS
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


def test_bench_refuses_unknown_sections() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "fowrard", "--small"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "unknown section(s) ['fowrard']" in proc.stderr
