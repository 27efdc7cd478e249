"""effopt's generation loop: prefill, then one token per step over a static (or quantized, or sink) cache.

Several prompts of different lengths decode together: each prompt is prefilled into its own cache
row, each row keeps its own position, and a row that finished (EOS or its token budget) leaves the
batch at once (its cache row is dropped), so later steps only compute live sequences. On CUDA the
decode step of a static cache is replayed from a CUDA graph (graphs.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from effopt.generation.decoder import Decoder
from effopt.generation.sampling import Sampling, pick
from effopt.nn.kv_cache import kv_config, runtime_of


@dataclass
class Generation:
    """Tokens and timings of one `generate` call.

    Attributes:
        tokens: the new tokens of each prompt (prompts excluded), in prompt order.
        prefill_s: seconds of the prefill forward passes (all prompts).
        ttft_s: seconds from the call until every prompt had its first new token.
        decode_s: seconds of the decode steps after that.
        decode_tokens: tokens produced by those steps (all rows).
        steps: decode steps (forward passes after prefill).
        kv_cache_bytes: bytes the cache needs for the final sequences (all rows, all layers).
        cache: cache kind used.
        capture_s: seconds spent capturing the CUDA graph (between the first token and decoding).
        batch_sizes: rows alive at each decode step.
    """

    tokens: list[list[int]]
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    steps: int = 0
    kv_cache_bytes: int = 0
    cache: str = "bf16"
    capture_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput (tokens of all rows per second)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def default_cache_kind(model) -> str:
    """The cache a model's runtime options ask for: int8/int4 when `kv_cache` is set, else float."""
    cfg = kv_config(runtime_of(model))
    return f"int{cfg['bits']}" if cfg else "bf16"


def sync(device: torch.device) -> None:
    """Wait for queued device work (so host clocks time it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(decoder: Decoder, cache, ids: list[int], row: int = 0) -> torch.Tensor:
    """Run prompt `ids` into cache row `row`; return the logits of its last position [V].

    A sink cache takes the prompt in chunks that fit (StreamingLLM's eviction is per token).
    """
    dev = decoder.device
    if hasattr(cache, "room"):
        done, logits = 0, None
        while done < len(ids):
            n = cache.room()
            chunk = torch.tensor([ids[done:done + n]], device=dev)
            logits = decoder.forward(chunk, torch.tensor([done], device=dev), cache, last_only=True)
            done += chunk.shape[1]
        return logits[0, -1]
    view = cache.row(row) if cache.batch_size() > 1 else cache
    tokens = torch.tensor([ids], device=dev)
    logits = decoder.forward(tokens, torch.zeros(1, dtype=torch.long, device=dev), view, kv_len=len(ids),
                             last_only=True)
    return logits[0, -1]


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int | list[int], sampling: Sampling = Sampling(),
             eos_token_id: int | None = None, cache: str | None = None, graph: bool | None = None,
             seed: int = 0, sink: int = 4, window: int = 252, decoder: Decoder | None = None,
             compile_step: bool = False) -> Generation:
    """Generate continuations of `prompts` (token id lists) with effopt's decode path.

    Args:
        max_new_tokens: per prompt (a list) or for all.
        cache: bf16/float, int8, int4 or sink; default from the model's runtime (`effopt.nn.runtime.use_runtime`).
        graph: replay the decode step from a CUDA graph (default: on CUDA, except for a sink cache).
        decoder: a prepared Decoder (e.g. with fused projections) to reuse.
        compile_step: torch.compile the step before capturing it (CUDA).
    """
    decoder = decoder or Decoder(model)
    dev = decoder.device
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    kind = cache or default_cache_kind(model)
    graph = (dev.type == "cuda" and kind != "sink") if graph is None else graph
    if kind == "sink" and len(prompts) > 1:
        raise ValueError("the sink cache decodes one sequence at a time")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    max_len = max(len(p) + n for p, n in zip(prompts, budgets)) + 1  # the last slot is the graphs' scratch
    kv = decoder.new_cache(kind, len(prompts), max_len, sink=sink, window=window)
    out = Generation(tokens=[[] for _ in prompts], cache=kind)
    make_step = None
    if graph:
        from effopt.generation.graphs import GraphStep

        def make_step(batch: int):
            return GraphStep(decoder, kv, batch, 1, max_len - 1, compile_step)

    sync(dev)
    t0 = time.perf_counter()
    last = [prefill(decoder, kv, p, row=b) for b, p in enumerate(prompts)]
    sync(dev)
    out.prefill_s = time.perf_counter() - t0
    cur = pick(torch.stack(last), sampling, gen)
    for b, tok in enumerate(cur.tolist()):
        out.tokens[b].append(tok)
    out.ttft_s = time.perf_counter() - t0
    # Captured after prefill, so no later eager call (of another shape) can reallocate a buffer
    # the graph points into; the capture's own time is reported apart, not as decode time.
    step = make_step(len(prompts)) if make_step else None
    sync(dev)
    t1 = time.perf_counter()
    out.capture_s = t1 - t0 - out.ttft_s
    _decode_loop(decoder, kv, prompts, budgets, cur, out, sampling, gen, eos_token_id, step, make_step)
    sync(dev)
    out.decode_s = time.perf_counter() - t1
    per_token = kv.bytes_per_token() if hasattr(kv, "bytes_per_token") else None
    held = [len(p) + len(t) - 1 for p, t in zip(prompts, out.tokens)]
    out.kv_cache_bytes = int(per_token * sum(held)) if per_token is not None else kv.nbytes()
    return out


def _finished(tokens: list[int], budget: int, eos: int | None) -> bool:
    return len(tokens) >= budget or (eos is not None and tokens[-1] == eos)


def _decode_loop(decoder, kv, prompts, budgets, cur, out: Generation, sampling, gen, eos, step, make_step):
    """Decode until every row finished; finished rows leave the batch (their cache rows are dropped).

    With CUDA graphs, a smaller batch needs a new capture (counted in decode time).
    """
    dev = decoder.device
    active = list(range(len(prompts)))
    pos = [len(p) for p in prompts]  # next position to write, per active row
    while True:
        keep = [i for i, b in enumerate(active) if not _finished(out.tokens[b], budgets[b], eos)]
        if not keep:
            return
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=dev)
            kv.keep_rows(rows)
            cur = cur.index_select(0, rows)
            active, pos = [active[i] for i in keep], [pos[i] for i in keep]
            step = make_step(len(active)) if make_step else None
        start = torch.tensor(pos, device=dev)
        if step is not None:
            logits = step(cur.view(-1, 1), start)
        else:
            logits = decoder.forward(cur.view(-1, 1), start, kv, kv_len=max(pos) + 1)
        cur = pick(logits[:, -1], sampling, gen)
        out.steps += 1
        out.batch_sizes.append(len(active))
        for b, tok in zip(active, cur.tolist()):
            out.tokens[b].append(tok)
        out.decode_tokens += len(active)
        pos = [p + 1 for p in pos]
