"""Checkpoints carrying their own (release-format) code, each with one planted fault or benign change, through the
suite as users run it: refused without --trust-remote-code; with it, a fault both files share is caught by the
reference, a last-layer and a head fault by the outputs after the penultimate layer (and the converted-weights
check), while the clean and numerics-only variants pass. Under the CPU default plan and the GPU plan (sampled
checks), each in float32 and in bfloat16, on two image cases. VITPARITY_FAULTS_OUT=DIR writes each run's record into
DIR/release/<plan>/ (the table: `python -m tests.faults.detection DIR/release/<plan>`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from faults import names_step
from faults.detection import detection_from_reports, divergences
from faults.release import RELEASE_VARIANTS, build_release_variant

pytestmark = pytest.mark.usefixtures("isolated")
CASE = "image-astronaut.jpg"  # the largest image: the GPU plan's outputs sample includes it
SMALLEST = "image-coffee_small.jpg"  # the smallest case: the GPU plan's reference sample
PLANS = {"cpu-plan": (), "gpu-plan": ("--determinism=sample", "--companions=sample", "--outputs=sample")}
RUNS = {f"{dtype}-{plan}": (f"--dtype={dtype}", *args) for dtype in ("float32", "bfloat16") for plan, args in PLANS.items()}
RECORDS = os.environ.get("VITPARITY_FAULTS_OUT")  # read at import: the `isolated` fixture clears VITPARITY_*


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """Test name (parameters dropped) -> 'passed' / 'failed', from the run's report lines."""
    found = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):
        if report.when == "call" or report.outcome != "passed":
            found[report.nodeid.split("::")[-1].split("[")[0]] = report.outcome
    return found


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("variant", RELEASE_VARIANTS, ids=lambda v: v.name)
def test_release_variant_verdict(suite, tmp_path, variant, run) -> None:
    hf, packing = build_release_variant(variant, tmp_path)
    select = f" or {variant.select}" if variant.select else ""
    args = [f"--hf-model={hf}", f"--packing-model={packing}", "-m", "not golden", "-k",
            f"{CASE} or {SMALLEST} or converted_weights{select}", *RUNS[run]]
    if variant.failing:  # without the flag: one usage error, no test
        refused = suite.run(*args)
        assert refused.ret == pytest.ExitCode.USAGE_ERROR and "--trust-remote-code" in refused.stderr.str()
    start = time.perf_counter()
    result = suite.run(*args, "--trust-remote-code")
    if RECORDS:
        dtype, plan = run.split("-", 1)
        detection = detection_from_reports(variant, dtype, result.ret, result.reprec.getreports("pytest_runtest_logreport"),
                                           result.reprec.getreports("pytest_collectreport"), time.perf_counter() - start)
        folder = Path(RECORDS) / "release" / plan
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{variant.name}-{dtype}.json").write_text(detection.to_json() + "\n")
    found = outcomes(result)
    out = result.stdout.str()
    assert {"test_parity", "test_outputs", "test_reference", "test_converted_weights", "test_batch"} <= set(found), \
        out[-3000:]
    failed = {name for name, outcome in found.items() if outcome != "passed"}
    plan = run.split("-", 1)[1]
    assert failed == set(variant.must_fail(plan)), f"{variant.name} ({run}): {variant.description}\n{out[-5000:]}"
    assert "code checked: hf: the checkpoint's own code" in out  # both files share RoPE, scale, MLP and norms:
    assert "NOTE: the two checkpoints' code differs" not in out  # no note (tests/test_code_compare.py: with one)
    named = divergences(result.reprec.getreports("pytest_runtest_logreport"))  # "<trace>: <divergence in words>"
    assert all(names_step(line.split(": ", 1)[1], variant.step) for line in named) and bool(named) == (
        variant.step != "none"), named
    if variant.name == "shared_rope_axes":  # both release files depart from the reference at the first attention
        assert "odd one out: common mode" in out
        for side in ("hf", "packing"):  # CASE on the CPU plan, SMALLEST on the GPU plan's reference sample
            trace = out[out.index(f"({side} vs the reference) ({run.split('-')[0]}, cpu"):]
            assert trace.splitlines()[1] == (  # what broke: the same sentence for each side, its side named
                f"first divergence: layer 1, q after RoPE (q before RoPE equal): the rotary embedding, h/w axes ({side})"
            ), trace[:2000]
    if variant.name == "last_layer_qk_swapped":
        assert "encoder.layers.3.self_attn.qkv.weight: differs" in out
