"""The decode step captured once as a CUDA graph and replayed per token (no per-kernel launches).

Eager PyTorch launches every kernel of every layer from Python: for a 32-layer model at batch 1
that costs more than the kernels themselves. A graph records the whole step (its kernels and their
fixed buffers) once; each token then costs one replay. Inputs are copied into static buffers
first. The cache must be static (StaticKVCache or QuantizedKVCache) and the step attends over the
cache's whole capacity (masked), so every replay has the same shapes.
"""

from __future__ import annotations

import torch


def capture(fn, device) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, outputs) of `fn()` captured as a CUDA graph, after three warm-up calls on a side stream
    (kernels autotune / compile there, outside the capture)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphStep:
    """`step(tokens [B, T], start [B]) -> logits [B, T, V]`, replayed from a captured CUDA graph.

    The graph is captured at construction, on inputs placed at `scratch` (a slot range past every
    position real tokens will reach, so the warm-up and capture writes never touch live cache
    entries). Each call copies its inputs into the static buffers and replays.
    """

    def __init__(self, decoder, cache, batch: int, t: int, scratch: int, compile_step: bool = False):
        self.forward = decoder.forward
        if compile_step:
            self.forward = torch.compile(decoder.forward, fullgraph=False, dynamic=False)
        dev = decoder.device
        self.tokens = torch.zeros(batch, t, dtype=torch.long, device=dev)
        self.start = torch.full((batch,), scratch, dtype=torch.long, device=dev)
        self.graph, self.logits = capture(lambda: self.forward(self.tokens, self.start, cache), dev)

    def __call__(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.start.copy_(start)
        self.graph.replay()
        return self.logits


class GreedyRollout:
    """`rollout(token, start) -> n tokens`: n greedy decode steps captured as one CUDA graph, each
    step's argmax fed to the next step on the device.

    A speculative draft proposes its k tokens this way with one replay and one host sync, where
    step-by-step proposing pays a replay, an argmax and a device-to-host sync per token (on the
    H200, fitted from three k: ~0.56 ms a proposal step by step, ~0.37 ms rolled out, for a 6-layer
    SmolLM2 draft; results/inference.md). Captured at
    `scratch` like GraphStep (n slots past every real position); off CUDA the steps run eagerly.
    """

    def __init__(self, decoder, cache, n: int, scratch: int):
        dev = decoder.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.start = torch.full((1,), scratch, dtype=torch.long, device=dev)

        def rollout() -> torch.Tensor:
            tok, out = self.token, []
            for i in range(n):
                logits = decoder.forward(tok, self.start + i, cache, last_only=True)
                tok = logits[:, -1, : decoder.vocab].argmax(-1, keepdim=True)
                out.append(tok)
            return torch.cat(out, 1)[0]

        self.rollout, self.graph = rollout, None
        if dev.type == "cuda":  # elsewhere the same steps run eagerly on each call (CPU tests)
            self.graph, self.tokens = capture(rollout, dev)

    def __call__(self, token: int, start: int) -> list[int]:
        self.token.fill_(token)
        self.start.fill_(start)
        if self.graph is None:
            return self.rollout().tolist()
        self.graph.replay()
        return self.tokens.tolist()
