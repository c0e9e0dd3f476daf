"""The release's published modeling files, unmodified, through the suite as users run it: the packing file imports
only where transformers says flash-attn 2 is available, and on this CPU it runs on the flash-attn stand-in, which
the run's summary names. The files are read from the fetched release repositories (tests/remote/published.py)."""

from __future__ import annotations

import sys

import pytest

from remote.published import STUBS, missing_sources, published_checkpoint

pytestmark = [pytest.mark.usefixtures("isolated"),
              pytest.mark.skipif(missing_sources() is not None, reason=str(missing_sources()))]
CASES = "image-coffee_small.jpg or video-rocket_tilt.mp4 or codec-rocket_tilt.mp4 or weights"


@pytest.fixture
def published_pair(tmp_path, monkeypatch) -> tuple[str, str]:
    monkeypatch.syspath_prepend(str(STUBS))  # timm's registry decorator, which the packing file imports
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    return (f"--hf-model={published_checkpoint('hf', tmp_path / 'hf')}",
            f"--packing-model={published_checkpoint('packing', tmp_path / 'packing')}")


def test_the_published_pair_passes_every_check_on_the_standin(suite, published_pair) -> None:
    """float32: parity, packs, paths, token order, outputs, the reference, converted and loaded weights."""
    result = suite.run(*published_pair, "--trust-remote-code", "-m", "not golden", "-k", CASES)
    out = result.stdout.str()
    assert result.ret == 0, out[-4000:]
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 15 and "failed" not in outcomes, outcomes
    assert ("packing: the checkpoint's own code vit_preview_v0_packing_hf.LlavaViTPackingModel with the flash-attn "
            "stand-in") in out
    assert "hf: the checkpoint's own code modeling_onevision_encoder.OneVisionEncoderModel" in out


def test_without_the_flag_the_published_pair_is_refused(suite, published_pair) -> None:
    result = suite.run(*published_pair, "-k", "weights")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "modeling_onevision_encoder.OneVisionEncoderModel" in result.stderr.str() and "--trust-remote-code" in result.stderr.str()
