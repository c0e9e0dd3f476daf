"""The flash-attn stand-in against plain per-segment attention, and its life in sys.modules."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vitparity import flash_attn_standin as standin

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def plain_segment_attention(q, k, v, scale, causal=False):
    """softmax(q k^T * scale) v of one segment, (n, H, D), written out in float32."""
    q, k, v = (x.float().transpose(0, 1) for x in (q, k, v))
    logits = q @ k.transpose(-1, -2) * scale
    if causal:
        n_q, n_k = q.shape[1], k.shape[1]
        allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(0, 1)


def packed(lengths, heads=2, dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=gen).to(dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_varlen_matches_plain_attention_per_segment(dtype, causal) -> None:
    lengths = [7, 1, 12, 5]
    q, k, v, cu = packed(lengths, dtype=dtype)
    scale = 0.3
    out = standin.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), dropout_p=0.0,
                                         softmax_scale=scale, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    start = 0
    for n in lengths:
        want = plain_segment_attention(q[start:start + n], k[start:start + n], v[start:start + n], scale, causal)
        diff = (out[start:start + n].float() - want).abs().max().item()
        assert diff < TOLERANCE[dtype], f"segment at {start}: max abs diff {diff} ({dtype})"
        start += n
    # No attention across segments: changing another segment's keys leaves the first segment bit-identical.
    k2 = k.clone()
    k2[7:] = -k2[7:]
    again = standin.flash_attn_varlen_func(q, k2, v, cu, cu, max(lengths), max(lengths), softmax_scale=scale,
                                           causal=causal)
    assert torch.equal(again[:7], out[:7])


def test_default_scale_is_inverse_sqrt_head_dim_and_kv_heads_are_shared() -> None:
    q, k, v, cu = packed([6, 4], heads=4, dim=32)
    k2, v2 = k[:, :2], v[:, :2]  # two key/value heads shared by pairs of query heads
    out = standin.flash_attn_varlen_func(q, k2, v2, cu, cu, 6, 6)
    want = plain_segment_attention(q[:6], k2[:6].repeat_interleave(2, 1), v2[:6].repeat_interleave(2, 1), 32 ** -0.5)
    assert (out[:6] - want).abs().max().item() < 1e-5


def test_batched_function_and_causal_with_more_keys_than_queries() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 2, 32, generator=gen)
    k, v = torch.randn(2, 5, 2, 32, generator=gen), torch.randn(2, 5, 2, 32, generator=gen)
    out = standin.flash_attn_func(q, k, v, softmax_scale=0.2, causal=True)
    assert out.shape == q.shape
    for b in range(2):  # bottom-right aligned: query i sees keys 0..i+2
        assert (out[b] - plain_segment_attention(q[b], k[b], v[b], 0.2, causal=True)).abs().max().item() < 1e-5


def test_dropout_is_applied_and_zero_dropout_is_exact() -> None:
    q, k, v, cu = packed([16])
    kept = standin.flash_attn_varlen_func(q, k, v, cu, cu, 16, 16, dropout_p=0.0)
    dropped = standin.flash_attn_varlen_func(q, k, v, cu, cu, 16, 16, dropout_p=0.5)
    assert not torch.allclose(kept, dropped)


@pytest.mark.parametrize("option, value", [("window_size", (4, 4)), ("softcap", 30.0), ("return_attn_probs", True)])
def test_unsupported_option_names_the_kernel_and_the_ways_on(option, value) -> None:
    q, k, v, cu = packed([4])
    with pytest.raises(standin.StandInUnsupported, match=rf"flash_attn\.flash_attn_varlen_func with {option}.*"
                                                          r"--own-classes"):
        standin.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, **{option: value})


def test_bad_segments_are_refused() -> None:
    q, k, v, _ = packed([4, 4])
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        standin.flash_attn_varlen_func(q, k, v, torch.tensor([0, 3]), torch.tensor([0, 8]), 8, 8)


def test_installed_only_inside_the_block_and_never_over_the_real_package(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    if standin.real_flash_attn_importable():
        pytest.skip("flash-attn is installed here")
    with standin.standin_installed() as installed:
        import flash_attn

        assert installed and flash_attn.flash_attn_varlen_func is standin.flash_attn_varlen_func
    assert "flash_attn" not in sys.modules and "flash_attn.flash_attn_interface" not in sys.modules
    real = types.ModuleType("flash_attn")  # a package that imports: the stand-in stays out
    monkeypatch.setitem(sys.modules, "flash_attn", real)
    with standin.standin_installed() as installed:
        assert not installed and sys.modules["flash_attn"] is real
    assert sys.modules["flash_attn"] is real
