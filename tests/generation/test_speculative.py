"""Speculative decoding: greedy output identical to plain greedy decoding token for token, and the
sampling acceptance rule reproduces the target's distribution."""

from __future__ import annotations

import pytest
import torch
from gen_models import lively_llama, noisy_copy, prompt

from effopt.generation import Sampling, generate
from effopt.generation.speculative import accept_greedy, accept_sampled, speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread



DRAFTS = {
    "same model": lambda t: t,
    "noisy copy": lambda t: noisy_copy(t, 0.3, 1),
    "unrelated, 1 layer": lambda t: lively_llama(seed=7, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64),
}


@pytest.mark.parametrize("draft_name,k,cache", [
    ("same model", 4, "bf16"), ("noisy copy", 1, "bf16"), ("noisy copy", 3, "bf16"), ("noisy copy", 6, "int8"),
    ("unrelated, 1 layer", 3, "bf16"), ("unrelated, 1 layer", 2, "int4"), ("noisy copy", 5, "int4")])
def test_greedy_speculative_equals_plain_greedy(draft_name, k, cache):
    """float64, so that no near-tie of the target's logits can flip between 1-token and k-token passes."""
    target = lively_llama(seed=0).double()
    draft = DRAFTS[draft_name](target).double()
    seen = set()
    for seed, n in ((0, 1), (1, 9), (2, 40), (3, 33)):
        ids = prompt(5 + 3 * seed, seed)
        plain = generate(target, [ids], n, cache=cache).tokens[0]
        spec = speculative_generate(target, draft, ids, n, k=k, cache=cache)
        assert spec.tokens == plain
        seen.update(plain)
    assert len(seen) > 8  # context-dependent continuations, not one repeated token
    if draft_name == "same model":
        assert spec.acceptance_rate == 1.0 and spec.tokens_per_target_call > k


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_rollout_drafts_equal_plain_greedy(k):
    """The draft's k proposals from one GreedyRollout call (what CUDA graphs replay), run eagerly here."""
    target = lively_llama(seed=0).double()
    draft = noisy_copy(target, 0.1, 2).double()
    for seed, n in ((1, 9), (2, 40)):
        ids = prompt(5 + 3 * seed, seed)
        spec = speculative_generate(target, draft, ids, n, k=k, rollout=True)
        stepwise = speculative_generate(target, draft, ids, n, k=k, rollout=False)
        assert spec.tokens == generate(target, [ids], n).tokens[0] == stepwise.tokens
        assert (spec.accepted, spec.target_calls) == (stepwise.accepted, stepwise.target_calls)
    assert 0 < spec.acceptance_rate < 1


def test_greedy_rollout_continues_like_plain_greedy():
    from effopt.generation import Decoder
    from effopt.generation.decode import prefill
    from effopt.generation.graphs import GreedyRollout

    model = lively_llama(seed=0).double()
    ids = prompt(9, 1)
    dec = Decoder(model)
    cache = dec.new_cache("bf16", 1, len(ids) + 20)
    tokens, pos = [int(prefill(dec, cache, ids).argmax())], len(ids)
    roll = GreedyRollout(dec, cache, 4, cache.max_len - 4)
    while len(tokens) < 13:
        tokens += roll(tokens[-1], pos)
        pos += 4
    assert tokens[:13] == generate(model, [ids], 13).tokens[0]


def test_speculative_counters():
    target = lively_llama()
    spec = speculative_generate(target, noisy_copy(target, 0.1, 2), prompt(7, 3), 30, k=4)
    assert spec.proposed == 4 * spec.target_calls
    assert 0 < spec.acceptance_rate < 1
    assert spec.round_tokens == spec.accepted + spec.target_calls
    assert len(spec.tokens) == 30


def test_speculative_stops_at_eos():
    target = lively_llama()
    ids = prompt(6, 4)
    plain = generate(target, [ids], 20).tokens[0]
    eos = plain[6]
    spec = speculative_generate(target, noisy_copy(target, 0.3, 5), ids, 20, k=3, eos_token_id=eos)
    assert spec.tokens == plain[: plain.index(eos) + 1]


def test_accept_greedy_takes_the_matching_prefix_then_the_targets_token():
    logits = torch.full((4, 10), -1.0)
    for i, t in enumerate([3, 5, 7, 9]):
        logits[i, t] = 1.0
    assert accept_greedy(logits, torch.tensor([3, 5, 7])) == (3, 9)
    assert accept_greedy(logits, torch.tensor([3, 4, 7])) == (1, 5)
    assert accept_greedy(logits, torch.tensor([0, 5, 7])) == (0, 3)


@pytest.mark.parametrize("case", range(3))
def test_sampling_acceptance_reproduces_the_target_distribution(case):
    """Leviathan et al. Theorem 1: the first emitted token is distributed as p_1, whatever q is."""
    gen = torch.Generator().manual_seed(case)
    vocab, k = 6, 2
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * 2, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * 2, -1)
    trials, counts, accepted = 20000, torch.zeros(vocab), 0
    for _ in range(trials):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(k)])
        n, nxt = accept_sampled(p, q, drafts, gen)
        first = int(drafts[0]) if n > 0 else nxt
        counts[first] += 1
        accepted += n > 0
    empirical = counts / trials
    assert (empirical - p[0]).abs().sum() / 2 < 0.02  # total variation; sampling noise is ~0.005
    # the first draft is kept with probability sum_x min(p(x), q(x))
    assert abs(accepted / trials - torch.minimum(p[0], q[0]).sum().item()) < 0.02


def test_sampled_speculative_decoding_is_reproducible():
    target = lively_llama()
    draft = noisy_copy(target, 0.3, 6)
    hot = Sampling(temperature=1.0)
    a = speculative_generate(target, draft, prompt(5, 7), 25, k=3, sampling=hot, seed=11)
    b = speculative_generate(target, draft, prompt(5, 7), 25, k=3, sampling=hot, seed=11)
    assert a.tokens == b.tokens and len(a.tokens) == 25
    assert 0 < a.acceptance_rate <= 1
