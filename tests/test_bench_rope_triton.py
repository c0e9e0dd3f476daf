"""The benchmarks' Triton RoPE kernel (bench/kernels/rope_triton.py) checked on the CPU through Triton's
interpreter (TRITON_INTERPRET=1), and its variant of both models inside a block only.

The kernel runs only on CUDA tensors; the interpreter executes the same kernel code with numpy, so its
indexing, masking, strides and rotation are checked here without a GPU. Triton reads TRITON_INTERPRET when a
kernel is defined, so the check runs in a fresh interpreter process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = r"""
import json
import torch
from bench.kernels import rope_triton
from vitparity.models.layers import apply_rope_reference

g = torch.Generator().manual_seed(0)
results = []
for dtype in ("float32", "float16", "bfloat16"):
    # token counts around the kernel's token block (32 at head_dim <= 64, 16 above), several head counts
    for tokens, heads, head_dim in [(1, 1, 2), (31, 3, 32), (33, 2, 64), (70, 4, 16), (17, 2, 128)]:
        # (H, T, D) transposed: token and head strides that are not the contiguous ones
        x = torch.randn(heads, tokens, head_dim, generator=g).to(getattr(torch, dtype)).transpose(0, 1)
        cos, sin = torch.randn(2, tokens, head_dim, generator=g)
        assert rope_triton.supported(x, cos)
        out = rope_triton.rope_thd(x, cos, sin)
        exact = apply_rope_reference(x.float(), cos[:, None], sin[:, None])
        info = torch.finfo(getattr(torch, dtype))
        step = torch.clamp(exact.abs() * info.eps, min=info.smallest_normal * info.eps)  # one unit in the last place
        results.append(dict(
            case=f"{dtype} T={tokens} H={heads} D={head_dim}",
            shape=list(out.shape), contiguous=out.is_contiguous(), dtype=str(out.dtype).split(".")[1],
            equal_to_reference=bool(torch.equal(out, apply_rope_reference(x, cos[:, None], sin[:, None]))),
            within_one_step=bool(((out.float() - exact).abs() <= step).all()),
            max_abs=float((out.float() - exact).abs().max()),
        ))
print(json.dumps(results))
"""


def test_triton_rope_kernel_matches_the_formula() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 15
    for r in results:
        tokens, heads, head_dim = (int(part.split("=")[1]) for part in r["case"].split()[1:])
        assert r["shape"] == [tokens, heads, head_dim] and r["contiguous"] and r["case"].startswith(r["dtype"]), r
        assert r["within_one_step"], r
        # float32 and float16: the same float32 products and one rounding, so bit-identical to the formula.
        # bfloat16: the interpreter converts float32 to bfloat16 by truncation, so up to one step apart.
        if r["dtype"] != "bfloat16":
            assert r["equal_to_reference"], r


def test_rope_variant_sets_and_restores() -> None:
    """`rope_variant("triton")` replaces both models' RoPE inside the block only; an unknown name is refused."""
    from bench.kernels.rope import apply_rope_triton, rope_status, rope_variant
    from vitparity.models import layers, modeling_onevision_encoder, modeling_onevision_encoder_packing

    modules = (modeling_onevision_encoder, modeling_onevision_encoder_packing)
    with rope_variant("triton"):
        assert all(module.apply_rope is apply_rope_triton for module in modules)
    assert all(module.apply_rope is layers.apply_rope for module in modules)
    assert rope_status("cpu")["path"] == "torch"
    with pytest.raises(ValueError, match="'auto' is not one of"):
        with rope_variant("auto"):
            pass
