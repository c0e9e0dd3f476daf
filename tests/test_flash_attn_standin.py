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


def contract_case(breach: str):
    """(q, k, v, cu_q, cu_k, max_q, max_k) of a two-segment pack in bfloat16, with one of flash-attn's rules broken."""
    q, k, v, cu = packed([4, 6], dtype=torch.bfloat16)
    args = {"q": q, "k": k, "v": v, "cu_q": cu, "cu_k": cu, "max_q": 6, "max_k": 6}
    wide = packed([4, 6], dim=264, dtype=torch.bfloat16)[0]
    breaches = {
        "cu_seqlens_q int64": {"cu_q": cu.long()},
        "cu_seqlens_k int64": {"cu_k": cu.long()},
        "cu_seqlens_q values": {"cu_q": torch.tensor([0, 7, 9], dtype=torch.int32)},
        "cu_seqlens_q not contiguous": {"cu_q": torch.tensor([0, 9, 4, 9, 10, 9], dtype=torch.int32)[::2]},
        "cu_seqlens_q 2-D": {"cu_q": cu[None]},
        "max_seqlen_q short": {"max_q": 5},
        "max_seqlen_k short": {"max_k": 5},
        "head size over 256": {"q": wide, "k": wide, "v": wide},
        "k dtype": {"k": k.float()},
        "v dtype": {"v": v.half()},
        "q dtype float64": {"q": q.double(), "k": k.double(), "v": v.double()},
        "v head size": {"v": v[..., :16]},
        "kv heads": {"k": torch.cat([k, k[:, :1]], 1), "v": torch.cat([v, v[:, :1]], 1)},
        "q layout": {"q": q.reshape(10, -1)},
    }
    args.update(breaches[breach])
    return tuple(args.values())


# each rule of flash-attn 2's contract (csrc/flash_attn/flash_api.cpp, mha_varlen_fwd) -> the argument it names
CONTRACT = {"cu_seqlens_q int64": "cu_seqlens_q must have dtype torch.int32",
            "cu_seqlens_k int64": "cu_seqlens_k must have dtype torch.int32",
            "cu_seqlens_q values": "cu_seqlens_q \\[0, 7, 9\\] must rise from 0 to the 10 packed tokens",
            "cu_seqlens_q not contiguous": "cu_seqlens_q must be a contiguous 1-D tensor",
            "cu_seqlens_q 2-D": "cu_seqlens_q must be a contiguous 1-D tensor",
            "max_seqlen_q short": "max_seqlen_q =5 is below the longest segment",
            "max_seqlen_k short": "max_seqlen_k =5 is below the longest segment",
            "head size over 256": "q has head size 264 .* at most 256",
            "k dtype": "k has dtype torch.float32, q torch.bfloat16",
            "v dtype": "v has dtype torch.float16, q torch.bfloat16",
            "q dtype float64": "q has dtype torch.float64; flash-attn takes float16 or bfloat16",
            "v head size": "k, v head sizes 32 and 16 must equal q's 32",
            "kv heads": "k has 3 heads; the number of key/value heads must divide q's 2",
            "q layout": "q must be a 3-D tensor"}


@pytest.mark.parametrize("breach", CONTRACT)
def test_what_flash_attn_refuses_the_standin_refuses_naming_the_argument(breach) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k = contract_case(breach)
    with pytest.raises(standin.FlashAttnContractError, match=f"^flash_attn_varlen_func: ({CONTRACT[breach]})"):
        standin.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


def test_what_flash_attn_takes_the_standin_takes() -> None:
    """The limits themselves pass: head size 256 (and 250, padded to 256 by flash-attn's wrapper), max_seqlen above
    the longest segment, a last dimension with a stride other than 1, float16, and float32 (served on a CPU)."""
    for dim in (256, 250):
        q, k, v, cu = packed([4, 6], dim=dim, dtype=torch.bfloat16)
        assert standin.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6).shape == q.shape
    q, k, v, cu = packed([4, 6], dtype=torch.float16)
    strided = torch.randn(10, 2, 64, dtype=torch.float16)[..., ::2]
    assert standin.flash_attn_varlen_func(strided, k, v, cu, cu, 9, 9).shape == q.shape
    q, k, v, cu = packed([4, 6], dtype=torch.float32)
    assert standin.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6).dtype == torch.float32


def test_the_batched_function_holds_the_contract() -> None:
    q = torch.randn(2, 5, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(standin.FlashAttnContractError, match="^flash_attn_func: k has dtype torch.float32"):
        standin.flash_attn_func(q, q.float(), q)
    with pytest.raises(standin.FlashAttnContractError, match="^flash_attn_func: q must be a 4-D tensor"):
        standin.flash_attn_func(q[0], q[0], q[0])


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


def test_every_question_about_flash_attn_answers_yes_inside_the_block_only(monkeypatch) -> None:
    """A release file that asks transformers, importlib or the package metadata whether flash-attn is there before it
    imports it gets yes while the stand-in is installed, and the machine's own answer before and after (also through
    a function it bound inside the block)."""
    import importlib.metadata
    import importlib.util

    from transformers import utils

    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    if standin.real_flash_attn_importable():
        pytest.skip("flash-attn is installed here")

    def answers() -> tuple:
        try:
            version = importlib.metadata.version("flash-attn")
        except importlib.metadata.PackageNotFoundError:
            version = None
        return utils.is_flash_attn_2_available(), importlib.util.find_spec("flash_attn") is not None, version

    before = answers()
    assert before == (False, False, None)
    with standin.standin_installed():
        assert answers() == (True, True, standin.VERSION)
        assert importlib.metadata.version("flash_attn") == standin.VERSION
        bound = utils.is_flash_attn_2_available
    assert answers() == before and bound() is False
    assert utils.is_flash_attn_2_available is bound.__wrapped__
