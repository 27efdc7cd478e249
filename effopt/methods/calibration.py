"""Layer-by-layer calibration: run a model's decoder one layer at a time over calibration text.

The calibration token ids are embedded once (the decoder layers are swapped for stubs that record
the keyword arguments the model passes each layer: attention masks and rotary tables, which differ
per layer type in Gemma-style models, and the last stub raises to stop the forward before the final
norm and the LM head). Then, for each decoder layer in order:

1. the layer moves to the compute device (when it lives elsewhere, e.g. CPU-resident weights with a
   CUDA compute device, so a model larger than GPU memory can be calibrated);
2. `on_layer(step)` is called. The callback can run the layer over the held inputs with hooks that
   see each linear's input activations (`step.run(hooks)`, or `accumulate_hessians(step, names)`
   for H = 2/n sum x x^T), and may change or replace the layer's modules;
3. the (possibly changed) layer runs over the inputs to produce the next layer's inputs, chunk by
   chunk in place, so only one layer's inputs are ever held (or the callback hands over outputs
   it already computed, `step.next_inputs`, saving that pass);
4. the layer goes back to where it was.

Usage::

    def on_layer(step):
        hessians = accumulate_hessians(step, step.linears(targets, ignore))
        ...  # quantize / prune each linear, e.g. step.replace(name, new_module)

    calibrate_layers(model, input_ids, on_layer, batch_size=8)
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from effopt import log


def release_host_memory() -> None:
    """Hand freed memory back to the OS (glibc keeps freed heap pages otherwise, so a process's RSS
    stays at its high-water mark); on CUDA, empty the caching allocator too. Cheap; no-op elsewhere."""
    import gc

    from effopt.hostmem import trim_heap

    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _StopForward(Exception):
    """Raised by the last layer stub: every layer's arguments have been recorded."""


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(full name, module) of the decoder layers of a Hugging Face causal LM (Llama, Gemma, Qwen...)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _to(value: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int,
                   device: torch.device | None = None) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering the first decoder layer, and every layer's keyword arguments.

    Args:
        input_ids: calibration token ids [n, seq_len].
        batch_size: sequences per chunk; chunks are what later forwards run on.
        device: where the captured tensors are put (default: where the embedding ran).

    Returns:
        (chunks of hidden states [b, seq_len, hidden], kwargs[layer][chunk]).
    """
    layers = decoder_layers(model)
    first: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def stub(index: int):
        def forward(hidden_states, *args, **kw):
            if args:
                raise TypeError("decoder layer called with positional arguments beyond hidden_states")
            if index == 0:
                first.append(hidden_states if device is None else hidden_states.to(device))
            kw = dict(kw, use_cache=False)
            kw.pop("cache", None), kw.pop("past_key_values", None), kw.pop("past_key_value", None)
            kwargs[index].append(kw if device is None else _to(kw, device))
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states
        return forward

    for i, (_, layer) in enumerate(layers):
        layer.forward = stub(i)
    home = next(model.parameters()).device
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(home), use_cache=False)
            except _StopForward:
                pass
    finally:
        for _, layer in layers:
            del layer.forward
    return first, kwargs


@dataclass
class LayerStep:
    """One decoder layer during calibration, as `on_layer` sees it.

    Attributes:
        index: position of the layer in the decoder.
        name: full module name of the layer (e.g. 'model.layers.3').
        layer: the layer module (on the compute device while the callback runs).
        inputs: chunks of hidden states entering the layer ([b, seq_len, hidden] each).
        kwargs: per chunk, the keyword arguments the model passes this layer.
        autocast: dtype for torch.autocast during forwards (None = the model's own dtype).
        next_inputs: set by the callback to hand these to the next layer instead of recomputing
            the layer's outputs (e.g. the outputs of a `run` before the layer was changed, when a
            method calibrates every layer on the float model's activations).
    """

    index: int
    name: str
    layer: torch.nn.Module
    inputs: list[torch.Tensor]
    kwargs: list[dict]
    autocast: torch.dtype | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    next_inputs: list[torch.Tensor] | None = None

    def linears(self, targets: list[str], ignore: list[str] = ()) -> dict[str, torch.nn.Module]:
        """{name relative to the layer: module} of linear-like modules whose full name matches a
        target glob and no ignore glob (nn.Linear and subclasses, e.g. MaskedLinear)."""
        out = {}
        for rel, module in self.layer.named_modules():
            full = f"{self.name}.{rel}"
            if not rel or not isinstance(module, torch.nn.Linear):
                continue
            if any(fnmatch.fnmatchcase(full, p) for p in targets) and \
                    not any(fnmatch.fnmatchcase(full, p) for p in ignore):
                out[rel] = module
        return out

    def autocast_context(self):
        """torch.autocast for this step's forwards (a no-op without `autocast`)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def call(self, chunk: int) -> torch.Tensor:
        """The layer's output on input chunk `chunk`."""
        with self.autocast_context():
            out = self.layer(self.inputs[chunk], **self.kwargs[chunk])
        out = out[0] if isinstance(out, tuple) else out
        return out.to(self.inputs[chunk].dtype)

    def advance(self) -> list[torch.Tensor]:
        """Overwrite each input chunk with the layer's output on it (the next layer's inputs), in the
        chunk's own storage (the held activations stay one block, allocated once); returns `inputs`,
        ready for `next_inputs`."""
        for i in range(len(self.inputs)):
            self.inputs[i].copy_(self.call(i))
        return self.inputs

    def run(self, hooks: dict[str, Callable[[torch.Tensor, int], None]], chunks: int | None = None,
            outputs: bool = False) -> list[torch.Tensor] | None:
        """Run the layer over the inputs; `hooks[name](x, chunk)` sees module `name`'s input
        flattened to [tokens, features] just before the module computes (hooks run outside
        autocast, so their own arithmetic keeps full precision).

        Args:
            hooks: {module name relative to the layer: callback}.
            chunks: only the first `chunks` chunks (default: all).
            outputs: return the layer's outputs (assign them to `next_inputs` to reuse them).
        """
        handles = []
        state = {"chunk": 0, "x": None, "flat": None}
        for rel, fn in hooks.items():
            def pre(module, args, fn=fn):
                if args[0] is not state["x"]:  # one flat view per input tensor: identity marks sharing
                    state["x"], state["flat"] = args[0], args[0].reshape(-1, args[0].shape[-1])
                with torch.autocast(self.device.type, enabled=False):  # statistics in full precision
                    fn(state["flat"], state["chunk"])
            handles.append(self.layer.get_submodule(rel).register_forward_pre_hook(pre))
        out = []
        try:
            for i in range(len(self.inputs) if chunks is None else min(chunks, len(self.inputs))):
                state["chunk"] = i
                y = self.call(i)
                if outputs:
                    out.append(y)
        finally:
            for handle in handles:
                handle.remove()
            state.clear()
        return out if outputs else None

    def replace(self, name: str, module: torch.nn.Module) -> None:
        """Swap the submodule at `name` (relative to the layer) for `module`."""
        parent, _, child = name.rpartition(".")
        setattr(self.layer.get_submodule(parent) if parent else self.layer, child, module)

    def tokens(self) -> int:
        """Calibration tokens held."""
        return sum(x.shape[0] * x.shape[1] for x in self.inputs)


class SharedInputs:
    """Compute a statistic once per distinct input tensor: q/k/v share one input, gate/up another.

    Keeps the inputs of the current chunk alive until `new_chunk()`, so identity (`is`) is reliable.
    """

    def __init__(self):
        self._seen: list[tuple[torch.Tensor, Any]] = []
        self._chunk = -1

    def get(self, x: torch.Tensor, chunk: int, make: Callable[[], Any]) -> tuple[Any, bool]:
        """(value for input x, whether it was just made) — `make()` runs once per distinct x."""
        if chunk != self._chunk:
            self._seen, self._chunk = [], chunk
        for seen, value in self._seen:
            if seen is x:
                return value, False
        value = make()
        self._seen.append((x, value))
        return value, True


@torch.no_grad()
def accumulate_hessians(step: LayerStep, names: list[str] | dict, chunks: int | None = None) -> dict[str, torch.Tensor]:
    """H = 2/n * sum_x x x^T (float32) of each named linear's input over the held inputs.

    Linears that share one input tensor (q/k/v, gate/up) share one H object, computed once.

    Args:
        step: the current layer.
        names: module names relative to the layer.
        chunks: only the first `chunks` input chunks (default all).
    """
    owner: dict[str, str] = {}  # module -> the first module seen with the same input tensor
    sums: dict[str, list] = {}  # owner -> [sum of x x^T, tokens]
    shared = SharedInputs()

    def hook(name: str):
        def fn(x: torch.Tensor, chunk: int) -> None:
            first, fresh = shared.get(x, chunk, lambda: name)
            owner.setdefault(name, first)
            if fresh:
                xf = x.float()
                if name not in sums:
                    sums[name] = [torch.zeros(xf.shape[1], xf.shape[1], device=xf.device), 0]
                sums[name][0].addmm_(xf.T, xf)
                sums[name][1] += xf.shape[0]
        return fn

    step.run({n: hook(n) for n in names}, chunks)
    for h, n in sums.values():
        h.mul_(2.0 / max(n, 1))
    return {name: sums[first][0] for name, first in owner.items()}


@torch.no_grad()
def calibrate_layers(model: torch.nn.Module, input_ids: torch.Tensor, on_layer: Callable[[LayerStep], None], *,
                     batch_size: int = 8, device: torch.device | str | None = None,
                     autocast: torch.dtype | None = None, description: str = "calibrating") -> int:
    """Walk the decoder layers in order, calling `on_layer(step)` and feeding each layer's (updated)
    outputs to the next.

    Args:
        model: a Hugging Face causal LM.
        input_ids: calibration token ids [n, seq_len].
        on_layer: called once per decoder layer with a LayerStep; may change the layer.
        batch_size: sequences per forward chunk.
        device: compute device (default: the model's). Layers living elsewhere are moved there one
            at a time and moved back afterwards.
        autocast: run layer forwards under torch.autocast with this dtype (e.g. bfloat16 on CPU for
            speed); hidden states between layers keep the model's dtype.

    Returns:
        The number of calibration tokens.
    """
    layers = decoder_layers(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    release_host_memory()
    inputs, kwargs = capture_inputs(model, input_ids, batch_size, device)
    inputs = list(torch.cat(inputs).split(batch_size))  # one block, updated in place (LayerStep.advance)
    for index, (name, layer) in enumerate(log.progress(layers, description)):
        home = next(layer.parameters()).device
        layer.to(device)
        step = LayerStep(index, name, layer, inputs, kwargs[index], autocast, device)
        on_layer(step)
        if step.next_inputs is None:
            step.advance()  # in place: one layer's inputs held at a time
        elif step.next_inputs is not inputs:
            for held, new in zip(inputs, step.next_inputs):
                held.copy_(new)
        layer.to(home)
        kwargs[index] = []
        step = None
        release_host_memory()
    return int(input_ids.numel())
