"""Sequential layer-by-layer pruning on the shared calibration engine (methods/calibration.py).

Each decoder layer runs once over all calibration samples (one chunk). Just before a targeted
linear computes, a callback receives that linear's full input (every calibration token) and may
rewrite the linear's weight in place; the layer then goes on with the pruned weight, and its
outputs feed the next layer. So every linear is calibrated on inputs that already reflect the
pruning of every layer and sub-layer before it (the "true sequential" order: q/k/v, then o, then
gate/up, then down), for the cost of a single forward pass through the decoder. Only one layer's
activations are held at a time.
"""

from __future__ import annotations

from typing import Callable

import torch

from effopt.methods.calibration import calibrate_layers, decoder_layers


def run_layers(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str],
               on_input: Callable[[str, torch.nn.Module, torch.Tensor], None],
               on_layer_end: Callable[[int], None] | None = None, description: str = "calibrating") -> None:
    """Run the decoder layer by layer over `input_ids`, calling `on_input` before each named linear.

    Args:
        names: full module names of the linears to calibrate; all must sit inside decoder layers.
        on_input: `(name, module, x)` with x the linear's input for all samples, [tokens, in]; it
            may change `module.weight` in place, and the layer computes with the changed weight.
        on_layer_end: called with the layer index after each layer.
    """
    prefixes = [name + "." for name, _ in decoder_layers(model)]
    outside = [n for n in names if not any(n.startswith(p) for p in prefixes)]
    if outside:
        raise ValueError(f"layer-by-layer calibration reaches only decoder-layer linears, not {outside[:3]}")
    wanted = set(names)

    def on_layer(step) -> None:
        hooks = {}
        for rel, module in step.layer.named_modules():
            full = f"{step.name}.{rel}"
            if rel and full in wanted:
                hooks[rel] = lambda x, chunk, full=full, module=module: on_input(full, module, x)
        step.next_inputs = step.run(hooks, outputs=True)
        if on_layer_end is not None:
            on_layer_end(step.index)

    with torch.no_grad():
        calibrate_layers(model, input_ids, on_layer, batch_size=input_ids.shape[0], description=description)


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
