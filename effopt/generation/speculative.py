"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a draft proposes, the target verifies.

Each round the draft model proposes k tokens one at a time; the target scores all of them in one
forward pass over k + 1 positions. Acceptance:
  * greedy (temperature 0): keep the longest prefix of drafts equal to the target's argmax, then
    append the target's own argmax at the first mismatch (or after the last draft). The output is
    exactly what greedy decoding of the target alone produces.
  * sampling: keep draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    draw from norm(max(0, p_i - q_i)); if all k are kept draw one more from p_{k+1}. Every emitted
    token is distributed exactly as sampling from the target (p, q: the warped distributions).
Rejected drafts leave stale entries in both static caches; they sit past the accepted length, are
masked out and get overwritten, so rolling back costs nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from effopt.generation.decode import prefill, sync
from effopt.generation.decoder import Decoder
from effopt.generation.sampling import Sampling, pick, probabilities


@dataclass
class SpecResult:
    """Tokens and counters of one speculative generation."""

    tokens: list[int]
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0  # verification forwards (prefill excluded)
    draft_calls: int = 0
    round_tokens: int = 0  # tokens produced by verification rounds
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        """New tokens per verification forward of the target."""
        return self.round_tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens kept after the first, per second of decoding (a last round's overshoot is not counted)."""
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")


def accept_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """(accepted count, next token) for greedy verification.

    Args:
        target_logits: [k + 1, V] target logits at the positions before each draft and after the last.
        drafts: [k] proposed tokens.
    """
    best = target_logits.argmax(-1)
    match = (best[:-1] == drafts).long()
    n = int(match.cumprod(0).sum())
    return n, int(best[n])


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """(accepted count, next token) by the speculative sampling rule.

    Args:
        p: [k + 1, V] target probabilities; q: [k, V] draft probabilities the drafts were drawn from.
        drafts: [k] proposed tokens.
    """
    k = drafts.shape[0]
    idx = torch.arange(k, device=p.device)
    ratio = p[idx, drafts] / q[idx, drafts].clamp_min(1e-20)
    u = torch.rand(k, generator=generator).to(p.device)
    ok = (u < ratio.clamp(max=1.0)).long()
    n = int(ok.cumprod(0).sum())
    if n == k:
        dist = p[k]
    else:
        residual = (p[n] - q[n]).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[n]
    nxt = torch.multinomial(dist.float().cpu(), 1, generator=generator)
    return n, int(nxt)


class _Stepper:
    """Forward passes of one model over its cache: eager, or CUDA-graph replays for fixed token counts.

    Graphs are captured up front (`counts`) on the cache's last slots, which real tokens never reach.
    """

    def __init__(self, decoder: Decoder, cache, graph: bool, counts: tuple[int, ...] = ()):
        from effopt.generation.graphs import GraphStep

        self.decoder, self.cache = decoder, cache
        self.graphs = self.rollout = None
        if graph:
            self.graphs = {t: GraphStep(decoder, cache, 1, t, cache.max_len - t) for t in counts}

    def __call__(self, tokens: list[int], start: int) -> torch.Tensor:
        dev = self.decoder.device
        x = torch.tensor([tokens], device=dev)
        s = torch.tensor([start], device=dev)
        if self.graphs is None:
            return self.decoder.forward(x, s, self.cache, kv_len=start + len(tokens))[0]
        return self.graphs[len(tokens)](x, s)[0]


@torch.inference_mode()
def speculative_generate(target, draft, prompt: list[int], max_new_tokens: int, k: int = 4,
                         sampling: Sampling = Sampling(), eos_token_id: int | None = None, seed: int = 0,
                         cache: str = "bf16", graph: bool | None = None, target_decoder: Decoder | None = None,
                         draft_decoder: Decoder | None = None, rollout: bool | None = None) -> SpecResult:
    """Generate up to `max_new_tokens` after `prompt` with `draft` proposing k tokens per round.

    Both models must share the tokenizer (vocabularies may differ in padding rows only).
    rollout: greedy drafts propose all k tokens in one graphs.GreedyRollout call (default: with graphs).
    """
    if cache == "sink":
        raise ValueError("speculative decoding needs a static cache (bf16/float, int8 or int4), not sink")
    td, dd = target_decoder or Decoder(target), draft_decoder or Decoder(draft)
    dev = td.device
    graph = dev.type == "cuda" if graph is None else graph
    gen = torch.Generator(device="cpu").manual_seed(seed)
    max_len = len(prompt) + max_new_tokens + 2 * k + 4  # real tokens stay below the last k + 1 slots
    tcache, dcache = td.new_cache(cache, 1, max_len), dd.new_cache(cache, 1, max_len)
    res = SpecResult(tokens=[])

    sync(dev)
    t0 = time.perf_counter()
    first = pick(prefill(td, tcache, prompt), sampling, gen)
    prefill(dd, dcache, prompt)
    sync(dev)
    res.prefill_s = time.perf_counter() - t0
    seq = list(prompt) + [int(first)]
    res.tokens.append(int(first))
    res.ttft_s = time.perf_counter() - t0
    # graphs captured after prefill (see decode.generate); capture time is not decode time
    tstep, dstep = _Stepper(td, tcache, graph, (k + 1,)), _Stepper(dd, dcache, graph, (1,))
    if (graph if rollout is None else rollout) and sampling.greedy:  # k proposals, one replay and one sync
        from effopt.generation.graphs import GreedyRollout

        dstep.rollout = GreedyRollout(dd, dcache, k, dcache.max_len - k)
    sync(dev)
    t1 = time.perf_counter()
    draft_len = len(prompt)  # positions the draft cache holds correctly
    while len(res.tokens) < max_new_tokens and (eos_token_id is None or res.tokens[-1] != eos_token_id):
        drafts, qs, draft_len = _propose(dstep, seq, draft_len, k, sampling, gen, res)
        logits = tstep([seq[-1]] + drafts, len(seq) - 1)[:, : td.vocab].float()
        res.target_calls += 1
        n, nxt = _verify(logits, qs, drafts, sampling, gen)
        new = drafts[:n] + [nxt]
        res.proposed += k
        res.accepted += n
        draft_len = min(draft_len, len(seq) + n)  # the draft cache is right up to the last kept draft
        seq += new
        res.tokens += new
        res.round_tokens += len(new)
    sync(dev)
    res.decode_s = time.perf_counter() - t1
    res.tokens = _truncate(res.tokens, max_new_tokens, eos_token_id)
    return res


def _propose(dstep: _Stepper, seq: list[int], draft_len: int, k: int, sampling: Sampling, gen, res: SpecResult):
    """k draft tokens (and their probabilities); the draft first catches up on tokens it has not seen."""
    drafts: list[int] = []
    qs = []
    pending = seq[draft_len:]
    for tok in pending[:-1]:  # at most one: the last draft of a fully accepted round
        dstep([tok], draft_len)
        draft_len += 1
        res.draft_calls += 1
    tok = pending[-1]
    if dstep.rollout is not None:
        res.draft_calls += k
        return dstep.rollout(tok, draft_len), qs, draft_len + k
    for _ in range(k):
        logits = dstep([tok], draft_len)[-1].float()
        res.draft_calls += 1
        draft_len += 1
        if sampling.greedy:
            tok = int(logits.argmax())
        else:
            q = probabilities(logits, sampling)
            qs.append(q)
            tok = int(torch.multinomial(q.cpu(), 1, generator=gen))
        drafts.append(tok)
    return drafts, qs, draft_len


def _verify(logits: torch.Tensor, qs: list, drafts: list[int], sampling: Sampling, gen) -> tuple[int, int]:
    d = torch.tensor(drafts, device=logits.device)
    if sampling.greedy:
        return accept_greedy(logits, d)
    p = probabilities(logits, sampling)
    q = torch.stack(qs).to(p.device)
    if q.shape[-1] < p.shape[-1]:
        q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))
    return accept_sampled(p, q[:, : p.shape[-1]], d, gen)


def _truncate(tokens: list[int], limit: int, eos: int | None) -> list[int]:
    tokens = tokens[:limit]
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens
