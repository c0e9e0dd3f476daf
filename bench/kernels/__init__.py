"""The benchmarks' kernel variants of both encoders, apart from the product: packed backends (varlen, nested,
flash_attn, flash_attn_4, flex), SDPA kernel switches (cudnn, flash, efficient, math, fa3, fa4) and the Triton RoPE.

The product's models run the attention transformers' attn_implementation names ("sdpa" or "eager",
`vitparity.models.packed_attention`) and the torch RoPE; `variant(...)` runs them on another kernel for the
duration of a block by replacing the functions their modules call (`attention.py`, `rope.py`).
"""
