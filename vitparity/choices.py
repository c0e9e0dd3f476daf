"""Values shared by the library and the suite's options, in a module that imports nothing: the option table
(`vitparity.suite.options`) reads them without importing numpy, OpenCV or torch."""

from __future__ import annotations

# Patch alignment of a size that is not a multiple of the patch size (vitparity.media.align_to_patch).
ALIGN_POLICIES: tuple[str, ...] = ("crop", "resize", "pad")
# Minimum per-token cosine, strictly greater, of packing vs non-packing features (vitparity.compare).
DEFAULT_THRESHOLD = 0.99
# The release protocol's temporal RoPE context in frames (vitparity.extract; a config's rope_temporal_size overrides it).
TEMPORAL_CONTEXT = 64
# Compute dtypes of the models, by torch's name (vitparity.loading.DTYPES maps them to torch dtypes).
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
