"""Speculative decoding with an EAGLE draft head (effopt/methods/distill/eagle.py).

Positions: the target's feature f_j (LM-head input at position j) predicts x_{j+1}; the draft's
cache slot j holds the pair (x_{j+1}, f_j) and its output g_j stands in for f_{j+1}. A round:
  1. the target verifies [x_{L-1}, d_1..d_k] at positions L-1..L+k-1 (one forward), which yields
     both its logits and the true features f_{L-1}..f_{L+k-1};
  2. acceptance exactly as in speculative.py (greedy: longest matching prefix, then the target's
     own token y; sampling: the speculative sampling rule), n drafts kept;
  3. the draft catches up on slots L-1..L-1+n with the true features and the kept tokens
     (d_1..d_n, y); it always runs k + 1 slots (fixed shapes), the slots past n hold junk that the
     next steps overwrite before any query can see them; its output at slot L-1+n gives d'_1;
  4. it rolls out k - 1 more steps on its own features g for d'_2..d'_k.
Greedy rounds run entirely on the device (acceptance included) and, on CUDA, as one CUDA graph
that also writes the next round's inputs, so a round costs one replay and one small read-back,
which overlaps the next round.
"""

from __future__ import annotations

import itertools
import time

import torch

from effopt.generation.decode import sync
from effopt.generation.decoder import Decoder
from effopt.generation.graphs import capture
from effopt.generation.sampling import Sampling, pick, probabilities
from effopt.generation.speculative import SpecResult, _truncate, accept_sampled


class EagleDrafter:
    """The head's one-layer model over its own cache: draft passes and rollouts."""

    def __init__(self, head, cache_kind: str, max_len: int, decoder: Decoder | None = None):
        self.head = head
        self.decoder = decoder or Decoder(head.draft_model).fuse()  # one q|k|v and one gate|up matmul
        self.cache = self.decoder.new_cache(cache_kind, 1, max_len)
        self.vocab = self.decoder.vocab

    def step(self, tokens: torch.Tensor, features: torch.Tensor, start: torch.Tensor):
        """(logits [T, V], g [T, h]) for slots start..start+T-1 holding (tokens[t], features[t]).

        tokens: [T] (one step ahead of the features); features: [T, h]; start: [1] device tensor.
        """
        x = self.head.fuse(tokens.view(1, -1), features.unsqueeze(0).to(self.decoder.dtype))
        logits, g = self.decoder.forward(tokens.view(1, -1), start, self.cache, embeds=x, return_hidden=True)
        return logits[0, :, : self.vocab], g[0]

    def rollout(self, tok: torch.Tensor, g: torch.Tensor, start: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Greedy: `steps` tokens after tok [1] whose feature is g [1, h], from slot `start` on (device only)."""
        out = []
        for i in range(steps):
            logits, g = self.step(tok, g, start + i)
            tok = logits.argmax(-1)
            out.append(tok)
        return out


class GreedyEagleRound:
    """One greedy round on device tensors; the inputs of the next round are written in place.

    Buffers: `tokens` [1, k + 1] = [x_{L-1}, d_1..d_k], `start` [1] = L - 1. After a call,
    `emitted` [k + 2] = [n, x_L..x_{L+n}, junk...] (the n kept drafts and the target's token y).
    """

    def __init__(self, td: Decoder, tcache, drafter: EagleDrafter, k: int):
        dev = td.device
        self.td, self.tcache, self.drafter, self.k = td, tcache, drafter, k
        self.tokens = torch.zeros(1, k + 1, dtype=torch.long, device=dev)
        self.start = torch.zeros(1, dtype=torch.long, device=dev)
        self.emitted = torch.zeros(k + 2, dtype=torch.long, device=dev)
        self.arange = torch.arange(k + 1, device=dev)
        self.graph = None
        pinned = dev.type == "cuda"  # host rows the device copies into while the next round runs
        self.host = [torch.empty(k + 2, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.events = [torch.cuda.Event() if pinned else None for _ in range(2)]

    def __call__(self) -> None:
        k = self.k
        logits, feats = self.td.forward(self.tokens, self.start, self.tcache, return_hidden=True)
        best = logits[0, :, : self.td.vocab].argmax(-1)  # [k + 1]
        drafts = self.tokens[0, 1:]
        n = (best[:-1] == drafts).long().cumprod(0).sum().view(1)
        y = best.index_select(0, n)
        kept = torch.where(self.arange == n, y, torch.cat((drafts, y)))  # x_L..x_{L+n}, then junk
        dlogits, g = self.drafter.step(kept, feats[0], self.start)
        tok = dlogits.index_select(0, n).argmax(-1)
        new = [tok] + self.drafter.rollout(tok, g.index_select(0, n), self.start + n + 1, k - 1)
        self.emitted.copy_(torch.cat((n, kept)))
        self.tokens.copy_(torch.cat([y] + new).view(1, -1))
        self.start.add_(n + 1)

    def capture(self, scratch: int) -> None:
        """Record a round as a CUDA graph. The warm-up and capture rounds start at `scratch` and
        advance from there (4 rounds: up to 4 (k + 1) slots plus a rollout's 2k), past real tokens."""
        self.start.fill_(scratch)
        self.graph, _ = capture(self, self.td.device)

    def prime(self, last: int, drafts: list[int], start: int) -> None:
        """Set the first round's inputs: verify `drafts` after token `last` at position `start`."""
        self.tokens.copy_(torch.tensor([[last] + drafts]))
        self.start.fill_(start)

    def launch(self, slot: int) -> None:
        """Queue one round from the buffers as the last round left them; its emitted row goes to
        host slot `slot` (0 or 1, pinned on CUDA) without waiting for the device."""
        if self.graph is None:
            self()
        else:
            self.graph.replay()
        self.host[slot].copy_(self.emitted, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()

    def read(self, slot: int) -> list[int]:
        """[n, kept tokens...] of the round launched into `slot` (waits for that round only)."""
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return self.host[slot].tolist()


def scratch_slots(k: int) -> int:
    """Cache slots the graph warm-up and capture may write past the last real position."""
    return 4 * (k + 1) + 2 * k + 2


@torch.inference_mode()
def eagle_generate(target, head, prompt: list[int], max_new_tokens: int, k: int = 4,
                   sampling: Sampling = Sampling(), eos_token_id: int | None = None, seed: int = 0,
                   cache: str = "bf16", graph: bool | None = None, target_decoder: Decoder | None = None,
                   draft_decoder: Decoder | None = None) -> SpecResult:
    """Generate up to `max_new_tokens` after `prompt`, the EAGLE head proposing k tokens per round.

    Greedy output equals the target's greedy decoding; sampled tokens follow the target's
    distribution (speculative sampling). graph: CUDA graphs for greedy rounds (default on CUDA).
    """
    if cache == "sink":
        raise ValueError("speculative decoding needs a static cache (bf16/float, int8 or int4), not sink")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    td = target_decoder or Decoder(target)
    dev = td.device
    graph = dev.type == "cuda" and sampling.greedy if graph is None else graph and sampling.greedy
    gen = torch.Generator(device="cpu").manual_seed(seed)
    real_len = len(prompt) + max_new_tokens + 2 * k + 2
    max_len = real_len + scratch_slots(k)
    tcache = td.new_cache(cache, 1, max_len)
    drafter = EagleDrafter(head, cache, max_len, draft_decoder)
    res = SpecResult(tokens=[])

    sync(dev)
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    logits, feats = td.forward(ids, zero, tcache, kv_len=len(prompt), return_hidden=True)
    first = pick(logits[0, -1, : td.vocab], sampling, gen).view(1)
    res.prefill_s = time.perf_counter() - t0
    # the draft reads the prompt: slot j = (x_{j+1}, f_j), so the tokens are the prompt shifted by one
    dlogits, g = drafter.step(torch.cat((ids[0, 1:], first)), feats[0], zero)
    seq = list(prompt) + [int(first)]
    res.tokens.append(int(first))
    res.ttft_s = time.perf_counter() - t0
    if sampling.greedy:
        tok = dlogits[-1:].argmax(-1)
        drafts = [tok] + drafter.rollout(tok, g[-1:], zero + len(prompt), k - 1)
        drafts = torch.cat(drafts).tolist()
        round_ = GreedyEagleRound(td, tcache, drafter, k)
        if graph:
            round_.capture(real_len)
        sync(dev)
        t1 = time.perf_counter()
        # With a graph, round r + 1 is queued before round r's tokens are read (the graph writes its
        # own next inputs), so the device never waits for the host; the round queued past the end is
        # wasted. Eager rounds (CPU) run one at a time.
        round_.prime(seq[-1], drafts, len(seq) - 1)
        round_.launch(0)
        for r in itertools.count():
            if graph:
                round_.launch((r + 1) % 2)
            out = round_.read(r % 2)
            n, kept = out[0], out[1: out[0] + 2]
            _count(res, k, n)
            seq += kept
            res.tokens += kept
            if len(res.tokens) >= max_new_tokens or (eos_token_id is not None and eos_token_id in kept):
                break
            if not graph:
                round_.launch((r + 1) % 2)
    else:
        sync(dev)
        t1 = time.perf_counter()
        _sampled_rounds(td, tcache, drafter, dlogits[-1], g[-1:], seq, res, k, sampling, gen, max_new_tokens,
                        eos_token_id)
    sync(dev)
    res.decode_s = time.perf_counter() - t1
    res.tokens = _truncate(res.tokens, max_new_tokens, eos_token_id)
    return res


def _count(res: SpecResult, k: int, n: int) -> None:
    res.proposed += k
    res.accepted += n
    res.target_calls += 1
    res.draft_calls += k
    res.round_tokens += n + 1


def _sampled_rounds(td, tcache, drafter: EagleDrafter, dlogit, g, seq, res, k, sampling, gen, max_new_tokens,
                    eos_token_id) -> None:
    """Rounds with the speculative sampling rule (eager, host-driven): drafts are drawn from the
    head's warped distribution q, checked against the target's p."""
    dev = td.device

    def propose(logit, g, start: int):
        toks, qs = [], []
        for i in range(k):
            if i:
                logits, g = drafter.step(toks[-1], g, torch.tensor([start + i - 1], device=dev))
                logit = logits[-1]
            q = probabilities(logit, sampling)
            toks.append(torch.multinomial(q.cpu(), 1, generator=gen).to(dev))
            qs.append(q)
        return torch.cat(toks), torch.stack(qs)

    drafts, q = propose(dlogit, g, len(seq) - 1)
    while len(res.tokens) < max_new_tokens and (eos_token_id is None or res.tokens[-1] != eos_token_id):
        start = torch.tensor([len(seq) - 1], device=dev)
        tokens = torch.cat((torch.tensor([seq[-1]], device=dev), drafts)).view(1, -1)
        logits, feats = td.forward(tokens, start, tcache, return_hidden=True)
        p = probabilities(logits[0, :, : td.vocab], sampling)
        n, y = accept_sampled(p, q[:, : p.shape[-1]], drafts, gen)
        _count(res, k, n)
        kept = drafts.tolist()[:n] + [y]
        seq += kept
        res.tokens += kept
        padded = torch.tensor(kept + drafts.tolist()[n:], device=dev)  # k + 1 slots, junk past n
        dlogits, g = drafter.step(padded, feats[0], start)
        drafts, q = propose(dlogits[n], g[n: n + 1], len(seq) - 1)
