"""The benchmarks' attention variants (bench/kernels/attention.py) on the CPU: every packed backend and SDPA kernel
that runs here against float64 attention, what each needs, the calls into flash-attn and flash-attn-4 (checked
against stand-ins with their documented signatures), and the models run on a variant inside a block only."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from bench.kernels import attention as ba
from vitparity.models.packed_attention import PackedSegments

from test_attention import HEAD_DIM, HEADS, LENGTHS, SCALE, block_diagonal_reference, packed_qkv


@pytest.mark.parametrize("kernel", [k for k in ba.SDPA_KERNELS if k not in ("fa3", "fa4")])  # those: CUDA only
@pytest.mark.parametrize("lengths", [LENGTHS, (50,)], ids=["four-samples", "one-sample"])
def test_packed_sdpa_matches_block_diagonal_attention(kernel: str, lengths: tuple[int, ...]) -> None:
    q, k, v = packed_qkv(lengths)
    segments = PackedSegments.from_lengths(lengths, torch.device("cpu"))
    out = ba.packed_attention(q, k, v, segments, SCALE, "sdpa", kernel)
    expected = block_diagonal_reference(q, k, v, lengths, SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


CPU_BACKENDS = ("sdpa", "flex", "eager")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths", [LENGTHS, (50,)], ids=["four-samples", "one-sample"])
def test_cpu_backends_match_block_diagonal_attention(backend: str, lengths: tuple[int, ...]) -> None:
    """Every backend that runs on the CPU against float64 attention with an explicit mask (FlexAttention: block mask)."""
    q, k, v = packed_qkv(lengths)
    segments = PackedSegments.from_lengths(lengths, torch.device("cpu"))
    out = ba.packed_attention(q, k, v, segments, SCALE, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), block_diagonal_reference(q, k, v, lengths, SCALE), rtol=1e-5, atol=1e-5)


def test_flex_block_mask_check_fails_without_the_mask(monkeypatch) -> None:
    """The reference check above catches a FlexAttention call that lets samples see each other."""
    monkeypatch.setattr(ba, "_document_block_mask", lambda lengths, device: None)
    q, k, v = packed_qkv(LENGTHS)
    segments = PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    out = ba.packed_attention(q, k, v, segments, SCALE, backend="flex")
    assert not torch.allclose(out.double(), block_diagonal_reference(q, k, v, LENGTHS, SCALE), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("choice", ["eager", "default", "math", "flex_attention"])
def test_dense_attention_by_choice(choice: str) -> None:
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in packed_qkv((40,)))
    out = ba.dense_attention(q, k, v, 0.3, choice)
    expected = block_diagonal_reference(*(x[0].transpose(0, 1) for x in (q, k, v)), (40,), 0.3)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, rtol=1e-5, atol=1e-5)


def test_available_backends_on_cpu() -> None:
    assert ba.available_backends("cpu", torch.float32) == CPU_BACKENDS
    assert ba.available_backends("cpu", torch.bfloat16) == CPU_BACKENDS
    assert ba.available_sdpa_kernels("cpu", torch.float32) == ("default", "math")


def test_available_backends_follow_the_installed_packages(monkeypatch) -> None:
    monkeypatch.setattr(ba, "_has_flash_attn", lambda: True)
    monkeypatch.setattr(ba, "_has_flash_attn_4", lambda: False)
    monkeypatch.setattr(ba, "_has_varlen", lambda: True)
    found = ba.available_backends("cuda", torch.bfloat16)
    assert found == ("sdpa", "varlen", "nested", "flash_attn", "flex", "eager")
    assert ba.available_backends("cuda", torch.float32) == CPU_BACKENDS


def test_backend_choice_on_cpu() -> None:
    q = torch.zeros(4, HEADS, HEAD_DIM)
    for backend in ("varlen", "nested", "flash_attn", "flash_attn_4"):
        with pytest.raises(ValueError, match=f"{backend}.*needs a CUDA tensor"):
            ba.check_backend(backend, q)
    for kernel in ("fa3", "fa4"):
        with pytest.raises(ValueError, match=f"SDPA kernel '{kernel}' needs a CUDA tensor"):
            ba.check_sdpa_kernel(kernel, q)
    with pytest.raises(ValueError, match="unknown packed attention backend 'fast'"):
        ba.check_backend("fast", q)
    with pytest.raises(ValueError, match="unknown SDPA kernel 'fast'"):
        ba.check_sdpa_kernel("fast", q)


def test_named_backends_that_are_not_installed_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(ba, "_fast_cuda", lambda q: True)
    monkeypatch.setattr(ba, "_has_flash_attn", lambda: False)
    monkeypatch.setattr(ba, "_has_varlen", lambda: False)
    q = torch.zeros(4, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="'flash_attn' needs the flash-attn package"):
        ba.check_backend("flash_attn", q)
    with pytest.raises(ValueError, match="'varlen' needs torch.nn.attention.varlen"):
        ba.check_backend("varlen", q)


def _fake_flash_attn(calls: list[dict]) -> types.ModuleType:
    """A stand-in for the flash-attn package with its documented flash_attn_varlen_func signature."""

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False,
    ):  # fmt: skip
        assert q.dim() == 3 and q.shape == k.shape == v.shape and q.stride(-1) == 1
        assert cu_seqlens_q.dtype == torch.int32 and isinstance(max_seqlen_q, int)
        calls.append(
            dict(cu_q=cu_seqlens_q.tolist(), cu_k=cu_seqlens_k.tolist(), max_q=max_seqlen_q, max_k=max_seqlen_k,
                 dropout_p=dropout_p, scale=softmax_scale, causal=causal)
        )  # fmt: skip
        lengths = tuple(torch.diff(cu_seqlens_q).tolist())
        return block_diagonal_reference(q, k, v, lengths, softmax_scale).to(q.dtype)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def test_flash_attn_backend_passes_boundaries_and_scale(monkeypatch) -> None:
    """The flash_attn backend hands the package int32 cu_seqlens, host max lengths and our scale, non-causal."""
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    monkeypatch.setattr(ba, "_fast_cuda", lambda q: True)
    monkeypatch.setattr(ba, "_has_flash_attn", lambda: True)
    q, k, v = packed_qkv(LENGTHS)
    segments = PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    out = ba.packed_attention(q, k, v, segments, 0.2, backend="flash_attn")
    assert calls == [
        dict(cu_q=[0, 37, 42, 106, 107], cu_k=[0, 37, 42, 106, 107], max_q=64, max_k=64,
             dropout_p=0.0, scale=0.2, causal=False)
    ]  # fmt: skip
    torch.testing.assert_close(out.double(), block_diagonal_reference(q, k, v, LENGTHS, 0.2))


def _fake_flash_attn_cute(calls: list[dict]) -> types.ModuleType:
    """A stand-in for flash-attn-4's flash_attn.cute: keyword varlen call, (out, lse) returned."""

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
        softmax_scale=None, causal=False, **unused,
    ):  # fmt: skip
        assert not unused, unused
        assert q.dim() == 3 and q.shape == k.shape == v.shape and q.stride(-1) == 1
        assert cu_seqlens_q.dtype == torch.int32 and isinstance(max_seqlen_q, int)
        calls.append(dict(cu_q=cu_seqlens_q.tolist(), cu_k=cu_seqlens_k.tolist(), max_q=max_seqlen_q,
                          max_k=max_seqlen_k, scale=softmax_scale, causal=causal))  # fmt: skip
        lengths = tuple(torch.diff(cu_seqlens_q).tolist())
        out = block_diagonal_reference(q, k, v, lengths, softmax_scale).to(q.dtype)
        return out, torch.zeros(q.shape[1], q.shape[0])

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = flash_attn_varlen_func
    package = types.ModuleType("flash_attn")
    package.cute = cute
    return package


def test_flash_attn_4_backend_passes_boundaries_and_scale(monkeypatch) -> None:
    """flash_attn_4 hands flash_attn.cute int32 cu_seqlens, host max lengths and our scale, and keeps `out`."""
    calls: list[dict] = []
    package = _fake_flash_attn_cute(calls)
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", package.cute)
    monkeypatch.setattr(ba, "_fast_cuda", lambda q: True)
    monkeypatch.setattr(ba, "_has_flash_attn_4", lambda: True)
    q, k, v = packed_qkv(LENGTHS)
    segments = PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    out = ba.packed_attention(q, k, v, segments, 0.2, backend="flash_attn_4")
    assert calls == [dict(cu_q=[0, 37, 42, 106, 107], cu_k=[0, 37, 42, 106, 107], max_q=64, max_k=64, scale=0.2,
                          causal=False)]  # fmt: skip
    torch.testing.assert_close(out.double(), block_diagonal_reference(q, k, v, LENGTHS, 0.2))


def test_models_run_a_variant_inside_the_block_only() -> None:
    """`attention_variant` routes both models' attention calls to the named variant, and back after the block."""
    from vitparity.convert import convert_config, hf_to_packing_state_dict
    from vitparity.models import OneVisionEncoderConfig, OneVisionEncoderModel, OneVisionEncoderPackingModel

    torch.manual_seed(0)
    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=4)
    hf = OneVisionEncoderModel(OneVisionEncoderConfig(**tiny)).eval()
    packing = OneVisionEncoderPackingModel(convert_config(hf.config)).eval()
    packing.load_state_dict(hf_to_packing_state_dict(hf.state_dict()))
    pixels = torch.randn(1, 3, 8, 12)
    patches = pixels.view(1, 3, 2, 4, 3, 4).permute(0, 2, 4, 1, 3, 5).reshape(6, 48)
    calls: list[str] = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        original = ba._flex_call
        patch.setattr(ba, "_flex_call", lambda *a, **kw: calls.append("flex") or original(*a, **kw))
        base = hf(pixels).last_hidden_state[0], packing(patches, [[1, 2, 3]]).last_hidden_state
        with ba.attention_variant(hf="flex_attention", packing=("flex", "default")):
            varied = hf(pixels).last_hidden_state[0], packing(patches, [[1, 2, 3]]).last_hidden_state
        assert len(calls) == 2 * tiny["num_hidden_layers"]
        hf(pixels), packing(patches, [[1, 2, 3]])
    assert len(calls) == 2 * tiny["num_hidden_layers"]
    for a, b in zip(base, varied):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
