"""vitparity: parity of packing and non-packing vision encoders, as a pytest suite and a CLI."""

from .loading import LoadedModel, ModelLoadError, load_model

__version__ = "0.1.0"

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "__version__"]
