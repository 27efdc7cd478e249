"""Input second moments X X^T of targeted linear layers, gathered decoder layer by layer.

The calibration batches are embedded once; then each decoder layer in turn runs on the hidden
states the previous (possibly already compressed) layers produced, with forward hooks summing
x^T x over the inputs of that layer's targeted linears. A callback may change the layer before
its outputs are recomputed and handed to the next one, so later layers are calibrated on what
the compressed model really feeds them (as GPTQ and SVD-LLM do). Only one layer's inputs and
outputs are held at a time.
"""

from __future__ import annotations

from typing import Callable

import torch

from effopt import log


class _StopForward(Exception):
    """Raised by the last stub layer: everything needed has been recorded."""


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the decoder layers of a Hugging Face causal LM (Llama, Gemma, ...)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering the first decoder layer and the keyword arguments every layer gets.

    The decoder layers are replaced by stubs while the model runs, so only the embedding, the
    rotary tables and the masks are computed (per-layer kwargs differ for sliding-window layers).
    """
    layers = decoder_layers(model)
    seen: list[dict] = []
    first: list[torch.Tensor] = []

    def stub(index: int):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise TypeError("decoder layer called with positional arguments beyond hidden_states")
            if index == 0:
                first.append(hidden_states)
            seen.append(kwargs)
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states
        return forward

    for i, (_, layer) in enumerate(layers):
        layer.forward = stub(i)
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for _, layer in layers:
            del layer.forward
    return first[0], seen


class _MomentHooks:
    """Forward pre-hooks that add x^T x (float64) of each watched module's input. A tensor feeding
    several modules (q/k/v, gate/up) is multiplied once and those modules share one sum tensor."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self._batch: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if id(x) not in self._batch:  # x is kept in the entry so its id stays unique this batch
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                self._batch[id(x)] = (x, (flat.T @ flat).double(), [])
            _, increment, done = self._batch[id(x)]
            if name not in self.sums:
                self.sums[name] = done[0] if done else torch.zeros_like(increment)
            acc = self.sums[name]
            if not any(acc is d for d in done):
                acc += increment
                done.append(acc)
        return hook

    def next_batch(self) -> None:
        """Forget the tensors of the batch just run (their sums are kept)."""
        self._batch.clear()

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


def _run_layer(layer: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
               hooks: _MomentHooks | None = None) -> list[torch.Tensor]:
    out = []
    for h, kw in zip(hidden, kwargs):
        y = layer(h, **kw)
        out.append(y[0] if isinstance(y, tuple) else y)
        if hooks is not None:
            hooks.next_batch()
    return out


@torch.no_grad()
def sequential_moments(model: torch.nn.Module, samples: torch.Tensor, targets: list[str],
                       on_layer: Callable[[int, dict[str, torch.Tensor]], bool], batch_size: int = 8) -> int:
    """Walk the decoder layers in order, giving `on_layer(index, {target name: X X^T})` each layer's sums.

    Args:
        model: a Hugging Face causal LM.
        samples: calibration token ids [n, seq_len].
        targets: full module names of the linear layers to watch; all must sit inside decoder layers.
        on_layer: called once per decoder layer that holds targets; returns True when it changed the
            layer, so its outputs are recomputed before feeding the next layer.
        batch_size: sequences per forward.

    Returns:
        The number of calibration tokens.
    """
    layers = decoder_layers(model)
    outside = [t for t in targets if not any(t.startswith(name + ".") for name, _ in layers)]
    if outside:
        raise ValueError(f"calibrated low-rank needs targets inside decoder layers; outside: {outside[:3]}")
    hidden, kwargs = [], []
    for batch in samples.split(batch_size):
        h, kw = layer_inputs(model, batch)
        hidden.append(h)
        kwargs.append(kw)
    for index, (prefix, layer) in enumerate(log.progress(layers, "calibrating decoder layers")):
        watched = {t: model.get_submodule(t) for t in targets if t.startswith(prefix + ".")}
        if not watched:
            hidden = _run_layer(layer, hidden, [kw[index] for kw in kwargs])
            continue
        hooks = _MomentHooks(watched)
        try:
            out = _run_layer(layer, hidden, [kw[index] for kw in kwargs], hooks)
        finally:
            hooks.remove()
        if on_layer(index, hooks.sums):
            out = _run_layer(layer, hidden, [kw[index] for kw in kwargs])
        hidden = out
    return int(samples.numel())
