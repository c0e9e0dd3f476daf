"""What ran, for the JUnit XML of a suite run: the two models, the code (vitparity's version, the models' own code
or this package's), device, dtype, threshold and how large the media were (global property `vitparity_run`, JSON),
so that `vitparity report-junit` names them. Kept free of pytest, like `suite.costs`."""

from __future__ import annotations

from typing import Any

RUN_KEY = "vitparity_run"


def run_record(settings: Any, media_line: str, media_warnings: list[str]) -> dict[str, Any]:
    """The record of one run: `settings` (suite.settings.Settings), `media_line` (`MediaScale.line()`) and the
    representative-media warnings."""
    from .. import __version__

    return {
        "hf": str(settings.hf_model), "packing": str(settings.packing_model),
        "code": f"vitparity {__version__}; model code: "
                + ("the checkpoints' own (--trust-remote-code) where they ship it" if settings.trust_remote_code
                   else "vitparity's"),
        "device": settings.device, "dtype": settings.dtype, "threshold": settings.threshold,
        "media": media_line, "media_warnings": list(media_warnings),
    }


def run_lines(record: dict[str, Any]) -> list[str]:
    """Markdown list items of one record."""
    lines = [f"- models: hf `{record.get('hf')}`, packing `{record.get('packing')}` on {record.get('device')} in "
             f"{record.get('dtype')} (threshold: min cos > {record.get('threshold')})",
             f"- code: {record.get('code')}"]
    if record.get("media"):
        lines.append(f"- media: {record['media']}")
    lines += [f"- WARNING: {warning}" for warning in record.get("media_warnings", [])]
    return lines
