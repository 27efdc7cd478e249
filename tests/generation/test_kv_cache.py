"""KV caches: quantization numerics, quantized-cache logits against the float cache, the runtime
switch for plain forwards, and the StreamingLLM sink cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from effopt.generation import Decoder, generate
from effopt.generation.decode import prefill
from effopt.nn import kv_cache
from effopt.nn.kv_cache import (StaticKVCache, Step, dequantize_kv, fake_quantize_kv, kv_config, quantize_kv,
                                runtime_of)
from effopt.nn.runtime import use_runtime

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread



@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kv_error_is_at_most_half_a_step(bits, dtype):
    x = (torch.randn(2, 3, 17, 64) * torch.rand(2, 3, 17, 1) * 5).to(dtype)
    parts = quantize_kv(x, bits)
    back = dequantize_kv(parts, bits, torch.float32)
    scale = parts[1].float()
    assert parts[0].shape[-1] == 64 * bits // 8 and scale.shape == (2, 3, 17, 1)
    if bits == 8:  # symmetric: max|x| lands on code +-127, every error within half a step
        codes = parts[0]
        assert codes.dtype == torch.int8 and parts[1].dtype == torch.float32 and len(parts) == 2
        assert (codes.abs().amax(-1) == 127).all()
        bound = scale / 2 + 1e-6 * x.float().abs().amax(-1, keepdim=True)
    else:  # half a step of rounding, plus the zero point's own rounding (another half step) at most
        assert parts[0].dtype == torch.uint8 and parts[2].shape == (2, 3, 17, 1)
        bound = scale + (1e-2 * x.float().abs().amax(-1, keepdim=True) if dtype == torch.bfloat16 else 1e-6)
    assert ((back - x.float()).abs() <= bound).all()
    assert torch.equal(fake_quantize_kv(x, bits), back.to(dtype))


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([[0.0, 15.0, 3.0, 7.0]])
    codes, scale, zero = quantize_kv(x, 4)
    assert scale.item() == 1.0 and zero.item() == 0.0
    assert codes.tolist() == [[0 | (15 << 4), 3 | (7 << 4)]]


@pytest.mark.parametrize("bad", [{"bits": 3}, {"bits": 8, "granularity": "tensor"}])
def test_kv_config_rejects_unknown_settings(bad):
    with pytest.raises(ValueError):
        kv_config({"kv_cache": bad})


# Max |logit - float-cache logit| of a tiny random Llama over a 24-token prompt (measured ~0.002 and
# ~0.03 for 8 and 4 bits; logits are O(1)). Bounds are 5x that, and int4 must be worse than int8.
@pytest.mark.parametrize("kind,tol", [("int8", 0.01), ("int4", 0.15)])
def test_quantized_cache_logits_close_to_float_cache(kind, tol):
    model = tiny_llama()
    dec = Decoder(model)
    ids = torch.randint(3, 259, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0]
        cache = dec.new_cache(kind, 1, 32)
        got = dec.forward(torch.tensor([ids]), torch.zeros(1, dtype=torch.long), cache, kv_len=24)[0]
    err = (got - ref).abs().max().item()
    assert 0 < err < tol


@pytest.mark.parametrize("bits", [8, 4])
def test_use_runtime_forward_equals_quantized_cache(bits):
    """Perplexity under use_runtime measures exactly what the quantized cache computes."""
    model = tiny_llama()
    dec = Decoder(model)
    ids = torch.randint(3, 259, (1, 20), generator=torch.Generator().manual_seed(2))
    runtime = {"kv_cache": {"bits": bits, "granularity": "head_token"}}
    with torch.inference_mode():
        cached = dec.forward(ids, torch.zeros(1, dtype=torch.long), dec.new_cache(f"int{bits}", 1, 24), kv_len=20)
        plain = model(ids).logits
        with use_runtime(model, runtime):
            assert runtime_of(model) == runtime
            fake = model(ids).logits
    torch.testing.assert_close(fake, cached, atol=1e-5, rtol=0)
    assert (plain - fake).abs().max() > 1e-4
    assert model.config._attn_implementation == "sdpa" and runtime_of(model) == {}


def test_use_runtime_without_kv_cache_is_a_no_op():
    model = tiny_llama()
    with use_runtime(model, {}):
        assert model.config._attn_implementation == "sdpa"


def test_generation_uses_the_runtime_cache():
    model = tiny_llama()
    with use_runtime(model, {"kv_cache": {"bits": 4, "granularity": "head_token"}}):
        assert generate(model, [[5, 6, 7]], 3).cache == "int4"
    assert generate(model, [[5, 6, 7]], 3).cache == "bf16"


def test_quantized_cache_bytes():
    dec = Decoder(tiny_llama())  # 2 layers, 2 kv heads, head_dim 16, float32
    float_tok = dec.new_cache("bf16", 1, 8).bytes_per_token()
    assert float_tok == 2 * 2 * 2 * 16 * 4
    assert dec.new_cache("int8", 1, 8).bytes_per_token() == 2 * 2 * 2 * (16 + 4)  # codes + a float32 scale
    assert dec.new_cache("int4", 1, 8).bytes_per_token() == 2 * 2 * 2 * (8 + 2 * 4)


@pytest.mark.parametrize("t", [1, 4])
def test_attend_stored_decode_kernel_matches_sdpa(t, monkeypatch):
    """A decode (t=1) or speculative verify (t=4) step through the split-KV kernel equals the masked SDPA path.

    The kernel path needs CUDA; on CPU `_kernel_ok` is forced so it runs under TRITON_INTERPRET."""
    if kv_cache.attention_kernels() is None:
        pytest.skip("Triton not importable")
    from kernels import attention

    monkeypatch.setattr(attention, "DEBUG_POISON", True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    cache = StaticKVCache(1, 2, 2, 48, 64, dtype, device)  # GQA 3, capacity 48 > every length
    for buf in cache.k + cache.v:  # slots past a row's length hold stale values the mask must hide
        buf.copy_(torch.randn_like(buf) * 4)
    q = torch.randn(2, 6, t, 64, dtype=dtype, device=device)
    start = torch.tensor([20, 9], device=device)
    monkeypatch.setattr(kv_cache, "USE_KERNELS", False)
    ref = cache.attend_stored(0, q, Step(start, t, rotary=None))
    monkeypatch.setattr(kv_cache, "USE_KERNELS", True)
    if device == "cpu":
        monkeypatch.setattr(StaticKVCache, "_kernel_ok", lambda self, q: kv_cache.USE_KERNELS)
    out = cache.attend_stored(0, q, Step(start, t, rotary=None))
    assert out.shape == ref.shape == (2, 6, t, 64)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1.6e-2  # bf16 vs bf16


@pytest.mark.parametrize("t", [1, 3])
def test_int8_cache_decode_kernel_matches_its_dequantized_sdpa(t, monkeypatch):
    """The int8 cache's kernel path (V kept [D, S]: the transposed view) equals dequantize + masked SDPA
    over the same codes, also after keep_rows, which must keep that layout."""
    if kv_cache.attention_kernels() is None:
        pytest.skip("Triton not importable")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    torch.manual_seed(0)
    cache = kv_cache.QuantizedKVCache(1, 3, 2, 48, 64, dtype, device, bits=8)  # GQA 3
    everywhere = torch.arange(48, device=device).view(1, 1, 48, 1).expand(3, 2, 48, 64)
    cache._store(0, torch.randn(3, 2, 48, 64, device=device, dtype=dtype) * 3,
                 torch.randn(3, 2, 48, 64, device=device, dtype=dtype), everywhere)  # stale slots included
    assert cache.v[0][0].stride(2) == 1 and cache.v[0][0].shape == (3, 2, 48, 64)
    q = torch.randn(3, 6, t, 64, dtype=dtype, device=device)
    start = torch.tensor([20, 9, 33], device=device)
    if device == "cpu":
        monkeypatch.setattr(kv_cache.QuantizedKVCache, "_kernel_ok", lambda self, q: kv_cache.USE_KERNELS)

    def both(q, start):
        monkeypatch.setattr(kv_cache, "USE_KERNELS", False)
        ref = cache.attend_stored(0, q, Step(start, t, rotary=None))
        monkeypatch.setattr(kv_cache, "USE_KERNELS", True)
        return cache.attend_stored(0, q, Step(start, t, rotary=None)), ref

    out, ref = both(q, start)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 5e-3
    cache.keep_rows(torch.tensor([2, 0], device=device))
    assert cache.v[0][0].stride(2) == 1 and cache.k[0][0].is_contiguous()
    kept, _ = both(q[[2, 0]], start[[2, 0]])
    torch.testing.assert_close(kept, out[[2, 0]], atol=2e-3, rtol=0)


@pytest.mark.parametrize("sink,window,length", [(4, 8, 30), (2, 5, 6), (0, 6, 20), (3, 10, 40)])
def test_sink_cache_keeps_first_tokens_and_window(sink, window, length):
    dec = Decoder(tiny_llama())
    cache = dec.new_cache("sink", 1, 0, sink=sink, window=window)
    ids = torch.randint(3, 259, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        prefill(dec, cache, ids)
    held = min(length, sink + window)
    expected = list(range(min(sink, length))) + list(range(length - (held - min(sink, length)), length))
    assert cache.kept_positions() == expected
    assert cache.k[0].shape[2] == held


def test_sink_cache_matches_full_cache_until_it_fills():
    model = tiny_llama()
    prompt = [7, 8, 9, 10, 11]
    full = generate(model, [prompt], 10).tokens[0]
    sink = generate(model, [prompt], 10, cache="sink", sink=4, window=20).tokens[0]
    assert sink == full


def test_sink_cache_generates_past_the_trained_context():
    """max_position_embeddings is 512: the sink cache decodes 600 tokens with a bounded cache."""
    model = tiny_llama(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    out = generate(model, [[5, 6, 7]], 600, cache="sink", sink=4, window=60)
    assert len(out.tokens[0]) == 600
    assert out.kv_cache_bytes == 64 * 2 * 1 * 1 * 16 * 4  # 64 positions, K+V, 1 layer, 1 head, d=16, fp32
