"""vitparity: parity of packing and non-packing vision encoders, as a pytest suite and a CLI."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "__version__"]


def __getattr__(name: str):
    """Import the torch-backed loader only when it is used, so light modules (media, compare) stay fast."""
    if name in ("LoadedModel", "ModelLoadError", "load_model"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'vitparity' has no attribute {name!r}")
