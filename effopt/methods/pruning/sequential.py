"""Sequential layer-by-layer calibration for pruning: pruned outputs feed the next layer.

The calibration samples are embedded once; each decoder layer then runs once over all of them.
Just before a targeted linear computes, a callback receives that linear's full input (every
calibration token) and may rewrite the linear's weight in place; the layer then goes on with the
pruned weight. So every linear is calibrated on inputs that already reflect the pruning of every
layer and sub-layer before it (the "true sequential" order: q/k/v, then o, then gate/up, then
down), at the cost of a single forward pass through the decoder. Only one layer's activations are
held at a time.
"""

from __future__ import annotations

from typing import Callable

import torch

from effopt import log


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers (`model.model.layers` in Llama/Gemma/Qwen/Mistral models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list at model.model.layers")
    return layers


def layer_prefix(model: torch.nn.Module, index: int) -> str:
    """Module-name prefix of decoder layer `index` (e.g. 'model.layers.3.')."""
    target = decoder_layers(model)[index]
    for name, module in model.named_modules():
        if module is target:
            return name + "."
    raise ValueError(f"decoder layer {index} not found in the module tree")


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The first layer's hidden states and the keyword arguments every layer is called with.

    Each layer is swapped for a stub that records its kwargs (attention mask, rotary embeddings,
    which may differ per layer type) and passes hidden states through, so the pass costs only the
    embedding.
    """
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = [{} for _ in layers]

    def stub(index: int):
        def forward(hidden_states, *args, **kw):
            if index == 0:
                hidden.append(hidden_states)
            kwargs[index] = dict(kw, use_cache=False, cache=None) if "cache" in kw else dict(kw, use_cache=False)
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        device = next(model.parameters()).device
        model.model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    return hidden[0], kwargs


def _call_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layers(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str],
               on_input: Callable[[str, torch.nn.Module, torch.Tensor], None],
               on_layer_end: Callable[[int], None] | None = None, description: str = "calibrating") -> None:
    """Run the decoder layer by layer over `input_ids`, calling `on_input` before each named linear.

    Args:
        names: full module names of the linears to calibrate; all must sit inside decoder layers.
        on_input: `(name, module, x)` with x the linear's input for all samples ([..., in]); it may
            change `module.weight` in place, and the layer computes with the changed weight.
        on_layer_end: called with the layer index after each layer (e.g. to swap in masked layers).
    """
    layers = decoder_layers(model)
    prefixes = [layer_prefix(model, i) for i in range(len(layers))]
    wanted = set(names)
    outside = [n for n in names if not any(n.startswith(p) for p in prefixes)]
    if outside:
        raise ValueError(f"layer-by-layer calibration reaches only decoder-layer linears, not {outside[:3]}")
    hidden, kwargs = capture_layer_inputs(model, input_ids)
    for i in log.progress(range(len(layers)), description):
        handles = []
        for name, module in layers[i].named_modules():
            full = prefixes[i] + name
            if full in wanted:
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, full=full: on_input(full, mod, args[0])))
        try:
            hidden = _call_layer(layers[i], hidden, kwargs[i])
        finally:
            for handle in handles:
                handle.remove()
        if on_layer_end is not None:
            on_layer_end(i)


class SharedInputStat:
    """Compute a statistic once per distinct input tensor within a layer (q/k/v share one input,
    gate/up another). Holds the inputs it has seen until `clear()`, so no address is reused."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for seen, value in self.items:
            if seen is x:
                return value
        value = self.fn(x)
        self.items.append((x, value))
        return value

    def clear(self, *_) -> None:
        """Forget every input (call at the end of each layer)."""
        self.items.clear()
