"""Attention of both encoders on the CPU: block-diagonal packing (one SDPA call per sample, or eager), the
attn_implementation names the models run, and what the goldens record of it. The benchmarks' kernel variants
(varlen, nested, flash-attn, FlexAttention, SDPA kernel switches) are checked in tests/test_bench_kernels.py."""

from __future__ import annotations

import pytest
import torch

from vitparity.models import packed_attention as pa

HEADS, HEAD_DIM = 4, 32
LENGTHS = (37, 5, 64, 1)
SCALE = HEAD_DIM**-0.5


def packed_qkv(lengths: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    return tuple(torch.randn(n, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(3))


def block_diagonal_reference(q, k, v, lengths: tuple[int, ...], scale: float) -> torch.Tensor:
    """Float64 attention over the whole sequence with an explicit block-diagonal mask (the slow, obvious way)."""
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = sample[:, None] == sample[None, :]
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))  # (H, N, D)
    scores = (q @ k.transpose(1, 2)) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (weights @ v).transpose(0, 1)  # (N, H, D)


@pytest.mark.parametrize("implementation", pa.ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("lengths", [LENGTHS, (50,)], ids=["four-samples", "one-sample"])
def test_packed_attention_matches_block_diagonal_attention(implementation: str, lengths: tuple[int, ...]) -> None:
    """Both implementations against float64 attention over the whole sequence with an explicit mask."""
    q, k, v = packed_qkv(lengths)
    segments = pa.PackedSegments.from_lengths(lengths, torch.device("cpu"))
    out = pa.packed_attention(q, k, v, segments, SCALE, implementation)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), block_diagonal_reference(q, k, v, lengths, SCALE), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", pa.ATTN_IMPLEMENTATIONS)
def test_packed_attention_keeps_samples_apart(implementation: str) -> None:
    """Changing one sample's keys and values leaves every other sample's output unchanged, bit for bit."""
    q, k, v = packed_qkv(LENGTHS)
    segments = pa.PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    before = pa.packed_attention(q, k, v, segments, SCALE, implementation)
    k2, v2 = k.clone(), v.clone()
    k2[37:42] += 3.0
    v2[37:42] -= 2.0
    after = pa.packed_attention(q, k2, v2, segments, SCALE, implementation)
    assert not torch.equal(before[37:42], after[37:42])
    assert torch.equal(before[:37], after[:37]) and torch.equal(before[42:], after[42:])


@pytest.mark.parametrize("implementation", pa.ATTN_IMPLEMENTATIONS)
def test_dense_attention_by_implementation_name(implementation: str) -> None:
    """Dense attention uses the given scale (not head_dim ** -0.5) in both implementations."""
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in packed_qkv((40,)))
    out = pa.dense_attention(q, k, v, 0.3, implementation)
    expected = block_diagonal_reference(*(x[0].transpose(0, 1) for x in (q, k, v)), (40,), 0.3)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_tries_cudnn_first_only_on_cuda_half() -> None:
    assert pa.sdpa_kernel_of(torch.zeros(1)) == "default"
    assert pa.sdpa_kernel_of(torch.zeros(1, dtype=torch.bfloat16)) == "default"
    assert pa.sdpa_kernel_of(torch.zeros(1, device="meta", dtype=torch.bfloat16)) == "default"


def test_segments_from_lengths() -> None:
    segments = pa.PackedSegments.from_lengths([3, 1, 4], torch.device("cpu"))
    assert segments.lengths == (3, 1, 4)
    assert segments.cu_seqlens.dtype == torch.int32 and segments.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert (segments.min_length, segments.max_length) == (1, 4)


@pytest.mark.parametrize("lengths", [[], [3, 0, 2], [-1]])
def test_segments_refuse_empty_samples(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        pa.PackedSegments.from_lengths(lengths, torch.device("cpu"))


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=4)


def test_models_follow_attn_implementation() -> None:
    """Both models run the kernel transformers' attn_implementation names, with the same maths as sdpa."""
    from vitparity.convert import convert_config, hf_to_packing_state_dict
    from vitparity.models import OneVisionEncoderConfig, OneVisionEncoderModel, OneVisionEncoderPackingModel

    torch.manual_seed(0)
    hf = OneVisionEncoderModel(OneVisionEncoderConfig(**TINY)).eval()
    packing = OneVisionEncoderPackingModel(convert_config(hf.config)).eval()
    packing.load_state_dict(hf_to_packing_state_dict(hf.state_dict()))
    pixels = torch.randn(1, 3, 8, 12)
    patches = pixels.view(1, 3, 2, 4, 3, 4).permute(0, 2, 4, 1, 3, 5).reshape(6, 48)
    with torch.no_grad():
        base_hf = hf(pixels).last_hidden_state[0]
        base_packing = packing(patches, [[1, 2, 3]]).last_hidden_state
        assert hf.config._attn_implementation == packing.config._attn_implementation == "sdpa"
        assert pa.attention_record(packing) == "packed backend sdpa, attention kernel default"
        for model in (hf, packing):
            model.set_attn_implementation("eager")
        assert pa.attention_record(packing) == "packed backend eager, attention kernel none"
        calls = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pa, "eager_attention", lambda *a, **kw: calls.append(1) or pa.sdpa_attention(*a, **kw))
            out_hf = hf(pixels).last_hidden_state[0]
            out_packing = packing(patches, [[1, 2, 3]]).last_hidden_state
    assert len(calls) == 2 * TINY["num_hidden_layers"]
    torch.testing.assert_close(out_hf, base_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_packing, base_packing, rtol=1e-5, atol=1e-5)


def test_models_refuse_other_attn_implementations() -> None:
    """transformers refuses flash and flex attention at loading; one set on the config later fails the forward."""
    from vitparity.models import OneVisionEncoderPackingConfig, OneVisionEncoderPackingModel

    model = OneVisionEncoderPackingModel(OneVisionEncoderPackingConfig(**TINY)).eval()
    assert model._supports_sdpa and not model._supports_flex_attn and not model._supports_flash_attn
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' is not supported by these models"):
        model(torch.zeros(4, 48), [[1, 2, 2]])
    assert pa.attention_record(torch.nn.Linear(2, 2)) == "the checkpoint code's own"
