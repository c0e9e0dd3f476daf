"""Attention kernels of both encoders on the CPU: block-diagonal packing, kernel choice, attn_implementation,
and the calls into flash-attn and flash-attn-4 (checked against stand-ins with their documented signatures)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vitparity.models import packed_attention as pa

HEADS, HEAD_DIM = 4, 32
LENGTHS = (37, 5, 64, 1)
SCALE = HEAD_DIM**-0.5


def _packed_qkv(lengths: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    return tuple(torch.randn(n, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(3))


def _block_diagonal_reference(q, k, v, lengths: tuple[int, ...], scale: float) -> torch.Tensor:
    """Float64 attention over the whole sequence with an explicit block-diagonal mask (the slow, obvious way)."""
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = sample[:, None] == sample[None, :]
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))  # (H, N, D)
    scores = (q @ k.transpose(1, 2)) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (weights @ v).transpose(0, 1)  # (N, H, D)


@pytest.mark.parametrize("kernel", [k for k in pa.SDPA_KERNELS if k not in ("fa3", "fa4")])  # those: CUDA only
@pytest.mark.parametrize("lengths", [LENGTHS, (50,)], ids=["four-samples", "one-sample"])
def test_packed_sdpa_matches_block_diagonal_attention(kernel: str, lengths: tuple[int, ...]) -> None:
    q, k, v = _packed_qkv(lengths)
    segments = pa.PackedSegments.from_lengths(lengths, torch.device("cpu"))
    out = pa.packed_attention(q, k, v, segments, SCALE, backend="auto", sdpa_kernel=kernel)
    expected = _block_diagonal_reference(q, k, v, lengths, SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


CPU_BACKENDS = ("sdpa", "flex", "eager")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths", [LENGTHS, (50,)], ids=["four-samples", "one-sample"])
def test_cpu_backends_match_block_diagonal_attention(backend: str, lengths: tuple[int, ...]) -> None:
    """Every backend that runs on the CPU against float64 attention with an explicit mask (FlexAttention: block mask)."""
    q, k, v = _packed_qkv(lengths)
    segments = pa.PackedSegments.from_lengths(lengths, torch.device("cpu"))
    out = pa.packed_attention(q, k, v, segments, SCALE, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _block_diagonal_reference(q, k, v, lengths, SCALE), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_attention_keeps_samples_apart(backend: str) -> None:
    """Changing one sample's keys and values leaves every other sample's output unchanged, bit for bit."""
    q, k, v = _packed_qkv(LENGTHS)
    segments = pa.PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    before = pa.packed_attention(q, k, v, segments, SCALE, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[37:42] += 3.0
    v2[37:42] -= 2.0
    after = pa.packed_attention(q, k2, v2, segments, SCALE, backend=backend)
    assert not torch.equal(before[37:42], after[37:42])
    assert torch.equal(before[:37], after[:37]) and torch.equal(before[42:], after[42:])


def test_flex_block_mask_check_fails_without_the_mask(monkeypatch) -> None:
    """The reference check above catches a FlexAttention call that lets samples see each other."""
    monkeypatch.setattr(pa, "_document_block_mask", lambda lengths, device: None)
    q, k, v = _packed_qkv(LENGTHS)
    segments = pa.PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    out = pa.packed_attention(q, k, v, segments, SCALE, backend="flex")
    assert not torch.allclose(out.double(), _block_diagonal_reference(q, k, v, LENGTHS, SCALE), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_dense_attention_by_implementation_name(implementation: str) -> None:
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in _packed_qkv((40,)))
    out = pa.dense_attention(q, k, v, 0.3, implementation)
    expected = _block_diagonal_reference(*(x[0].transpose(0, 1) for x in (q, k, v)), (40,), 0.3)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, rtol=1e-5, atol=1e-5)


def test_available_backends_on_cpu() -> None:
    assert pa.available_backends("cpu", torch.float32) == CPU_BACKENDS
    assert pa.available_backends("cpu", torch.bfloat16) == CPU_BACKENDS
    assert pa.available_sdpa_kernels("cpu", torch.float32) == ("default", "math")


def test_available_backends_follow_the_installed_packages(monkeypatch) -> None:
    monkeypatch.setattr(pa, "_has_flash_attn", lambda: True)
    monkeypatch.setattr(pa, "_has_flash_attn_4", lambda: False)
    monkeypatch.setattr(pa, "_has_varlen", lambda: True)
    found = pa.available_backends("cuda", torch.bfloat16)
    assert found == ("sdpa", "varlen", "nested", "flash_attn", "flex", "eager")
    assert pa.available_backends("cuda", torch.float32) == CPU_BACKENDS


def test_model_backend_maps_attn_implementation() -> None:
    q = torch.zeros(4, HEADS, HEAD_DIM)
    assert pa.model_backend("sdpa", "auto", q) == "sdpa"
    assert pa.model_backend("sdpa", "eager", q) == "eager"
    assert pa.model_backend("flex_attention", "auto", q) == "flex"
    assert pa.model_backend("eager", "eager", q) == "eager"
    with pytest.raises(ValueError, match="'flex_attention' runs backend 'flex', but packed_attention_backend is 'sdpa'"):
        pa.model_backend("flex_attention", "sdpa", q)
    with pytest.raises(ValueError, match="'flash_attention_3' is not supported by these models"):
        pa.model_backend("flash_attention_3", "auto", q)
    with pytest.raises(ValueError, match="'flash_attn_4' needs a CUDA tensor"):
        pa.model_backend("flash_attention_4", "auto", q)


def test_dense_sdpa_uses_the_given_scale() -> None:
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in _packed_qkv((20,)))
    out = pa.sdpa_attention(q, k, v, scale=0.3, kernel="math")
    expected = _block_diagonal_reference(*(x[0].transpose(0, 1) for x in (q, k, v)), (20,), 0.3)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, rtol=1e-5, atol=1e-5)


def test_segments_from_lengths() -> None:
    segments = pa.PackedSegments.from_lengths([3, 1, 4], torch.device("cpu"))
    assert segments.lengths == (3, 1, 4)
    assert segments.cu_seqlens.dtype == torch.int32 and segments.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert (segments.min_length, segments.max_length) == (1, 4)


@pytest.mark.parametrize("lengths", [[], [3, 0, 2], [-1]])
def test_segments_refuse_empty_samples(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        pa.PackedSegments.from_lengths(lengths, torch.device("cpu"))


def test_backend_choice_on_cpu() -> None:
    q = torch.zeros(4, HEADS, HEAD_DIM)
    assert pa.resolve_backend("auto", q) == "sdpa"
    assert pa.resolve_sdpa_kernel("auto", q) == "default"
    for backend in ("varlen", "nested", "flash_attn", "flash_attn_4"):
        with pytest.raises(ValueError, match=f"{backend}.*needs a CUDA tensor"):
            pa.resolve_backend(backend, q)
    for kernel in ("fa3", "fa4"):
        with pytest.raises(ValueError, match=f"SDPA kernel '{kernel}' needs a CUDA tensor"):
            pa.resolve_sdpa_kernel(kernel, q)
    with pytest.raises(ValueError, match="unknown packed attention backend 'fast'"):
        pa.resolve_backend("fast", q)
    with pytest.raises(ValueError, match="unknown SDPA kernel 'fast'"):
        pa.resolve_sdpa_kernel("fast", q)


def test_auto_keeps_the_measured_choice_when_flash_attn_is_installed(monkeypatch) -> None:
    """"auto" runs the backend measured fastest; flash-attn is used only when asked for by name."""
    monkeypatch.setattr(pa, "_fast_cuda", lambda q: True)
    monkeypatch.setattr(pa, "_has_flash_attn", lambda: True)
    q = torch.zeros(4, HEADS, HEAD_DIM)
    assert pa.resolve_backend("auto", q) == pa.AUTO_PACKED_BACKEND
    assert pa.resolve_sdpa_kernel("auto", q) == pa.AUTO_SDPA_KERNEL
    assert pa.resolve_backend("flash_attn", q) == "flash_attn"


def test_named_backends_that_are_not_installed_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(pa, "_fast_cuda", lambda q: True)
    monkeypatch.setattr(pa, "_has_flash_attn", lambda: False)
    monkeypatch.setattr(pa, "_has_varlen", lambda: False)
    q = torch.zeros(4, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="'flash_attn' needs the flash-attn package"):
        pa.resolve_backend("flash_attn", q)
    with pytest.raises(ValueError, match="'varlen' needs torch.nn.attention.varlen"):
        pa.resolve_backend("varlen", q)


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
        return _block_diagonal_reference(q, k, v, lengths, softmax_scale).to(q.dtype)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def test_flash_attn_backend_passes_boundaries_and_scale(monkeypatch) -> None:
    """The flash_attn backend hands the package int32 cu_seqlens, host max lengths and our scale, non-causal."""
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    monkeypatch.setattr(pa, "_fast_cuda", lambda q: True)
    monkeypatch.setattr(pa, "_has_flash_attn", lambda: True)
    q, k, v = _packed_qkv(LENGTHS)
    segments = pa.PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    out = pa.packed_attention(q, k, v, segments, 0.2, backend="flash_attn")
    assert calls == [
        dict(cu_q=[0, 37, 42, 106, 107], cu_k=[0, 37, 42, 106, 107], max_q=64, max_k=64,
             dropout_p=0.0, scale=0.2, causal=False)
    ]  # fmt: skip
    torch.testing.assert_close(out.double(), _block_diagonal_reference(q, k, v, LENGTHS, 0.2))


def test_choice_property_refuses_unknown_values() -> None:
    from vitparity.models import OneVisionEncoderPackingConfig, OneVisionEncoderPackingModel

    config = OneVisionEncoderPackingConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, patch_size=4
    )
    model = OneVisionEncoderPackingModel(config)
    model.packed_attention_backend = "sdpa"
    assert model.packed_attention_backend == "sdpa"
    with pytest.raises(ValueError, match="unknown packed attention backend 'flash'"):
        model.packed_attention_backend = "flash"
    with pytest.raises(ValueError, match="unknown attention kernel 'fa5'"):
        model.attention_kernel = "fa5"


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
        out = _block_diagonal_reference(q, k, v, lengths, softmax_scale).to(q.dtype)
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
    monkeypatch.setattr(pa, "_fast_cuda", lambda q: True)
    monkeypatch.setattr(pa, "_has_flash_attn_4", lambda: True)
    q, k, v = _packed_qkv(LENGTHS)
    segments = pa.PackedSegments.from_lengths(LENGTHS, torch.device("cpu"))
    out = pa.packed_attention(q, k, v, segments, 0.2, backend="flash_attn_4")
    assert calls == [dict(cu_q=[0, 37, 42, 106, 107], cu_k=[0, 37, 42, 106, 107], max_q=64, max_k=64, scale=0.2,
                          causal=False)]  # fmt: skip
    torch.testing.assert_close(out.double(), _block_diagonal_reference(q, k, v, LENGTHS, 0.2))


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=4)


@pytest.mark.parametrize("implementation", ["eager", "flex_attention"])
def test_models_follow_attn_implementation(implementation: str) -> None:
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
        for model in (hf, packing):
            model.set_attn_implementation(implementation)
            assert model.config._attn_implementation == implementation
        calls = []
        original = pa._flex_call if implementation == "flex_attention" else pa.eager_attention
        name = "_flex_call" if implementation == "flex_attention" else "eager_attention"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pa, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
            out_hf = hf(pixels).last_hidden_state[0]
            out_packing = packing(patches, [[1, 2, 3]]).last_hidden_state
    assert len(calls) == 2 * TINY["num_hidden_layers"]
    torch.testing.assert_close(out_hf, base_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_packing, base_packing, rtol=1e-5, atol=1e-5)


def test_models_refuse_flash_attention_3_and_conflicting_knobs() -> None:
    from vitparity.models import OneVisionEncoderPackingConfig, OneVisionEncoderPackingModel

    model = OneVisionEncoderPackingModel(OneVisionEncoderPackingConfig(**TINY)).eval()
    assert model._supports_sdpa and model._supports_flex_attn and model._supports_flash_attn
    model.config._attn_implementation = "flash_attention_3"
    with pytest.raises(ValueError, match="'flash_attention_3' is not supported by these models"):
        model(torch.zeros(4, 48), [[1, 2, 2]])
    model.config._attn_implementation = "flex_attention"
    model.packed_attention_backend = "sdpa"
    with pytest.raises(ValueError, match="but packed_attention_backend is 'sdpa'"):
        model(torch.zeros(4, 48), [[1, 2, 2]])
