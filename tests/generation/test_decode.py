"""effopt's decode path: same logits as transformers, same greedy tokens, batching where rows of
different lengths decode together and finished rows leave the batch, fused projections."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from gen_models import lively_llama, prompt

from effopt.generation import Decoder, Sampling, generate, unsupported_reason
from effopt.generation.fusion import fuse_linears

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread



def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_decoder_logits_equal_transformers(kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    dec = Decoder(model)
    ids = torch.tensor([prompt(19, 0)])
    with torch.inference_mode():
        ref = model(ids).logits
        cache = dec.new_cache("bf16", 1, 32)
        got = dec.forward(ids[:, :11], torch.zeros(1, dtype=torch.long), cache, kv_len=11)
        rest = dec.forward(ids[:, 11:], torch.tensor([11]), cache, kv_len=19)
    torch.testing.assert_close(torch.cat([got, rest], 1), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cache", ["bf16", "int8"])
def test_whole_buffer_step_equals_exact_length_step(cache):
    """kv_len=None (what a CUDA graph replays: every slot, masked) computes what the exact slice does;
    the stale slots past the position (here: filled with garbage) are never seen."""
    model = lively_llama()
    dec = Decoder(model)
    ids = prompt(12, 7)
    outs = []
    for kv_len in (13, None):
        kv = dec.new_cache(cache, 1, 40)
        for t in (kv.k if cache == "bf16" else [e[0] for e in kv.k]):
            t.random_(0, 100)
        with torch.inference_mode():
            dec.forward(torch.tensor([ids]), torch.zeros(1, dtype=torch.long), kv, kv_len=12)
            outs.append(dec.forward(torch.tensor([[5]]), torch.tensor([12]), kv, kv_len=kv_len))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_transformers_generate(seed):
    model = lively_llama(seed=seed)
    ids = prompt(9 + seed, seed)
    with torch.inference_mode():
        expected = _hf_greedy(model, ids, 25)
    assert generate(model, [ids], 25).tokens[0] == expected
    assert len(set(expected)) > 3


@pytest.mark.parametrize("cache", ["bf16", "int8", "int4"])
def test_batch_of_different_lengths_equals_per_prompt_decoding(cache):
    model = lively_llama()
    prompts = [prompt(n, i) for i, n in enumerate((5, 17, 9, 1))]
    budgets = [12, 7, 20, 3]
    single = [generate(model, [p], n, cache=cache).tokens[0] for p, n in zip(prompts, budgets)]
    batched = generate(model, prompts, budgets, cache=cache)
    assert batched.tokens == single
    # rows leave as they finish: 4 rows, then 3 (after 3 tokens), 2 (after 7), 1 (after 12)
    assert batched.batch_sizes == [4] * 2 + [3] * 4 + [2] * 5 + [1] * 8
    assert batched.decode_tokens == sum(budgets) - len(prompts)


def test_eos_ends_a_row_early():
    model = lively_llama()
    ids, other = prompt(6, 3), prompt(8, 4)
    free = generate(model, [ids], 15).tokens[0]
    eos = free[4]
    first = free.index(eos)
    out = generate(model, [ids, other], 15, eos_token_id=eos)
    assert out.tokens[0] == free[: first + 1]
    if eos not in out.tokens[1]:
        assert len(out.tokens[1]) == 15
        assert out.batch_sizes == [2] * first + [1] * (14 - first)


def test_sampling_is_reproducible_and_differs_from_greedy():
    model = lively_llama()
    ids = prompt(8, 5)
    hot = Sampling(temperature=2.0, top_k=50)
    a = generate(model, [ids], 30, sampling=hot, seed=3).tokens[0]
    b = generate(model, [ids], 30, sampling=hot, seed=3).tokens[0]
    assert a == b and a != generate(model, [ids], 30).tokens[0]


def test_fused_projections_give_the_same_tokens():
    model = lively_llama()
    ids = prompt(10, 6)
    plain = generate(model, [ids], 20)
    fused = generate(model, [ids], 20, decoder=Decoder(model).fuse())
    assert fused.tokens == plain.tokens


def test_fuse_quant_linears_is_exact():
    from effopt.methods.quant.rtn import quantize_weight
    from effopt.nn.quant_linear import QuantLinear

    layers = []
    for n in (32, 16, 16):
        w = torch.randn(n, 48)
        codes, s, z = quantize_weight(w, 4, 16)
        layers.append(QuantLinear.from_codes(codes, s, z, 4, 16, None, False, torch.float32))
    fused = fuse_linears(layers)
    x = torch.randn(3, 48)
    torch.testing.assert_close(fused(x), torch.cat([q(x) for q in layers], -1), atol=1e-6, rtol=0)
    assert fuse_linears([layers[0], torch.nn.Linear(48, 8)]) is None


def test_unsupported_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "expected" in unsupported_reason(model)
    with pytest.raises(ValueError):
        Decoder(model)
