"""AWQ (Lin et al., 2023): activation-aware weight quantization.

A few input channels carry much larger activations than the rest; the weights that multiply them
matter most. AWQ scales weight column j up by s_j (and the activation down by 1/s_j, folded into
the operator that produces the activation, so the float function is unchanged): the salient
columns then get relatively finer quantization steps. Per group of linears sharing one input,

    s = mean|x|^alpha (normalized so sqrt(max(s) * min(s)) = 1),  alpha in {0, 1/n, ..., (n-1)/n},

and alpha is chosen by grid search minimizing the mean squared error of the output of the block
that consumes those linears (self_attn for q/k/v, the MLP for gate/up, the linear itself for o_proj
and down_proj) with the linears fake-quantized, against the float output.
alpha = 0 (s = 1) is plain RTN, so the search never does worse than RTN on its own objective.

Groups and where their scales are folded (Llama-style layers; Gemma's (1 + w) norms are handled):
input_layernorm -> q/k/v; v_proj -> o_proj (only when v's outputs map one to one onto o's inputs,
i.e. no grouped-query attention); post-attention (or pre-feedforward) norm -> gate/up;
up_proj -> down_proj.

Then an optional clipping search (per output row and group, shrink the range by r in [0.5, 1],
minimizing that group's contribution to the output error over every calibration token, using the
diagonal blocks of X^T X; q/k are not clipped), and the final quantization by RTN or by GPTQ (with
the Hessian transformed by the scales: x' = x / s gives H' = D^-1 H D^-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effopt.methods.calibration import SharedInputs
from effopt.methods.quant.clip import apply_clip, block_gram, diag_blocks, search_clip
from effopt.methods.quant.rtn import fake_quantize


@dataclass
class ScaleGroup:
    """Linears sharing one input, the module producing that input, and the module whose output
    the search compares (all names relative to the decoder layer)."""

    prev: str
    linears: list[str]
    inspect: str


def _has(layer: torch.nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


def scale_groups(layer: torch.nn.Module) -> list[ScaleGroup]:
    """The AWQ scale groups of a Llama/Mistral/Qwen/Gemma-style decoder layer.

    Raises:
        ValueError: the layer does not have the expected attention/MLP structure.
    """
    attn = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    mlp = ["mlp.gate_proj", "mlp.up_proj"]
    needed = attn + ["self_attn.o_proj", "input_layernorm"] + mlp + ["mlp.down_proj"]
    missing = [n for n in needed if not _has(layer, n)]
    if missing:
        raise ValueError(f"AWQ knows Llama-style decoder layers; {type(layer).__name__} lacks {missing}")
    mlp_norm = "pre_feedforward_layernorm" if _has(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"
    groups = [ScaleGroup("input_layernorm", attn, "self_attn")]
    v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
    if v.out_features == o.in_features:
        groups.append(ScaleGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
    groups.append(ScaleGroup(mlp_norm, mlp, "mlp"))
    groups.append(ScaleGroup("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"))
    return groups


def norm_offset(norm: torch.nn.Module) -> float:
    """1.0 for norms computing x_hat * (1 + w) (Gemma), 0.0 for x_hat * w (Llama): probed by
    running the norm with its weight zeroed."""
    saved = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.zero_()
            probe = norm(torch.randn(2, saved.shape[0], dtype=saved.dtype, device=saved.device))
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)
    return 0.0 if bool((probe == 0).all()) else 1.0


@torch.no_grad()
def fold_scales(prev: torch.nn.Module, linears: list[torch.nn.Module], scales: torch.Tensor) -> None:
    """Divide `prev`'s output channels by `scales` and multiply the linears' input columns by them
    (the float function is unchanged)."""
    s = scales.to(prev.weight.dtype)
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s.view(-1, 1))
    else:
        offset = norm_offset(prev)
        prev.weight.copy_((prev.weight + offset) / s - offset)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype).view(1, -1))


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalized so that sqrt(max * min) = 1."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(linears: dict[str, torch.nn.Module], quantized: set[str], inspect, inputs: list[torch.Tensor],
                 x_mean: torch.Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int = 20):
    """Grid-search alpha; returns (best scales, best alpha, {alpha: loss}).

    Args:
        linears: every consumer of the shared input (all get W * s; only those in `quantized` are
            fake-quantized, the rest stay float).
        inspect: callable(x, chunk index) -> output of the block the loss is measured on.
        inputs: shared input chunks used for the search.
        x_mean: per-channel mean |x| over all calibration tokens.
    """
    originals = {name: m.weight.detach().clone() for name, m in linears.items()}
    reference = [inspect(x, i).float() for i, x in enumerate(inputs)]
    losses, best = {}, (float("inf"), 0.0, torch.ones_like(x_mean, dtype=torch.float32))
    try:
        for step in range(n_grid):
            alpha = step / n_grid
            s = awq_scales(x_mean, alpha)
            for name, m in linears.items():
                if name in quantized:
                    w = originals[name].float() * s.view(1, -1)
                    m.weight.copy_(fake_quantize(w, bits, group_size, symmetric) / s.view(1, -1))
            loss = sum(float((inspect(x, i).float() - ref).pow(2).mean()) for i, (x, ref) in
                       enumerate(zip(inputs, reference))) / len(inputs)
            losses[alpha] = loss
            if loss < best[0]:
                best = (loss, alpha, s)
    finally:
        for name, m in linears.items():
            m.weight.copy_(originals[name])
    return best[2], best[1], losses


class InputStats:
    """Per shared input of a decoder layer: sum |x| per channel, token count, the first `keep`
    chunks of x (for the scale search) and optionally x^T x (full, or its diagonal blocks)."""

    def __init__(self, keep: int, full_gram: bool, block_size: int | None):
        self.keep, self.full_gram, self.block_size = keep, full_gram, block_size
        self.abs_sum = None
        self.tokens = 0
        self.kept: list[torch.Tensor] = []
        self.gram = None

    def add(self, x: torch.Tensor, chunk: int, shape: torch.Size) -> None:
        """Fold one chunk's input (flattened [tokens, K]) into the statistics."""
        xf = x.float()
        a = xf.abs().sum(0)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        self.tokens += xf.shape[0]
        if chunk < self.keep:
            self.kept.append(x.reshape(*shape[:-1], x.shape[-1]).clone())
        if self.full_gram:
            g = xf.T @ xf
        elif self.block_size is not None:
            g = block_gram(xf, self.block_size)
        else:
            return
        self.gram = g if self.gram is None else self.gram.add_(g)

    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean |x| over every token seen."""
        return self.abs_sum / max(self.tokens, 1)


def collect_stats(step, names: list[str], keep: int, full_gram: bool, block_size: int | None):
    """One pass over the layer's inputs: (InputStats per linear, shared by linears sharing an
    input; the float layer's outputs)."""
    shared = SharedInputs()
    stats: dict[str, InputStats] = {}

    def hook(name: str):
        def fn(x: torch.Tensor, chunk: int) -> None:
            st, fresh = shared.get(x, chunk, lambda: stats.get(name) or InputStats(keep, full_gram, block_size))
            stats.setdefault(name, st)
            if fresh:
                st.add(x, chunk, step.inputs[chunk].shape)
        return fn

    outputs = step.run({n: hook(n) for n in names}, outputs=True)
    return stats, outputs


def _inspector(step, name: str):
    """callable(x, chunk) -> output of module `name` of the layer (attention gets the layer's kwargs)."""
    module = step.layer.get_submodule(name)
    takes_kwargs = name.endswith("self_attn") or name.endswith("attention")

    def run(x: torch.Tensor, chunk: int) -> torch.Tensor:
        with step.autocast_context():
            out = module(hidden_states=x, **step.kwargs[chunk]) if takes_kwargs else module(x)
        return out[0] if isinstance(out, tuple) else out
    return run


def _rescale_gram(gram: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """Gram of x / s from the Gram of x (full [K, K] or diagonal blocks [G, g, g])."""
    s = s.to(gram.dtype)
    if gram.dim() == 2:
        return gram / (s.view(-1, 1) * s.view(1, -1))
    blocks, g = gram.shape[0], gram.shape[1]
    sp = torch.ones(blocks * g, dtype=gram.dtype, device=gram.device)
    sp[: s.numel()] = s
    sp = sp.view(blocks, g)
    return gram / (sp.unsqueeze(2) * sp.unsqueeze(1))


@torch.no_grad()
def awq_layer(step, targeted: dict[str, torch.nn.Module], *, bits: int, group_size: int, symmetric: bool,
              n_grid: int = 20, clip: bool = True, quantizer: str = "rtn", search_chunks: int = 1,
              gptq_options: dict | None = None) -> dict:
    """AWQ on one decoder layer (a calibration LayerStep): search and fold scales, clip, quantize.

    As in the reference implementation, the next layer is calibrated on this layer's float outputs
    (computed in the same pass that gathers the statistics).

    Returns {linear name: chosen alpha} for the scaled groups.
    """
    from effopt.methods.quant.gptq import gptq_quantize, quantized_layer
    from effopt.methods.quant.rtn import quantize_weight

    groups = scale_groups(step.layer)
    names = sorted({n for grp in groups for n in grp.linears} | set(targeted))
    stats, step.next_inputs = collect_stats(step, names, search_chunks, quantizer == "gptq",
                                            group_size if clip else None)
    applied: dict[str, torch.Tensor] = {}
    alphas = {}
    for grp in groups:
        quantized = {n for n in grp.linears if n in targeted}
        if not quantized:
            continue
        linears = {n: step.layer.get_submodule(n) for n in grp.linears}
        st = stats[grp.linears[0]]
        s, alpha, _ = search_scale(linears, quantized, _inspector(step, grp.inspect), st.kept, st.mean_abs(),
                                   bits, group_size, symmetric, n_grid)
        fold_scales(step.layer.get_submodule(grp.prev), list(linears.values()), s)
        applied.update({n: s for n in grp.linears})
        alphas.update({n: alpha for n in quantized})
    for st in stats.values():
        st.kept = []
    for name, module in targeted.items():
        gram = stats[name].gram
        if gram is not None and name in applied:
            gram = _rescale_gram(gram, applied[name], group_size)
        weight = module.weight.data
        if clip and not name.endswith(("q_proj", "k_proj")):
            blocks = gram if gram.dim() == 3 else diag_blocks(gram, group_size)
            apply_clip(weight, search_clip(weight, blocks, bits, group_size, symmetric), group_size)
        mask = getattr(module, "weight_mask", None)
        w = weight * mask if mask is not None else weight
        if quantizer == "gptq":
            codes, scales, zeros, _ = gptq_quantize(w, 2 * gram / max(stats[name].tokens, 1), bits, group_size,
                                                    symmetric, mask=mask, **(gptq_options or {}))
        else:
            codes, scales, zeros = quantize_weight(w, bits, group_size, symmetric)
        step.replace(name, quantized_layer(module, codes, scales, zeros, bits, group_size, symmetric, "awq"))
    return alphas


@torch.no_grad()
def awq_model(model: torch.nn.Module, input_ids: torch.Tensor, targets: list[str], ignore: list[str], *,
              bits: int, group_size: int, symmetric: bool, n_grid: int = 20, clip: bool = True,
              quantizer: str = "rtn", search_samples: int = 8, batch_size: int = 8,
              gptq_options: dict | None = None, autocast: torch.dtype | None = None, device=None) -> dict:
    """AWQ over every decoder layer in order (each layer calibrated on the float outputs of the layer
    before it, as in the reference implementation; see `awq_layer`).

    Args:
        search_samples: calibration sequences the scale search's loss is measured on (the mean |x|
            statistics and the clipping search use every sequence).
        quantizer: 'rtn' or 'gptq' for the final rounding.
        gptq_options: percdamp / blocksize / act_order for the GPTQ quantizer.
    """
    from effopt.methods.calibration import calibrate_layers

    search_chunks = max(1, -(-search_samples // batch_size))
    alphas: list[float] = []
    count = {"layers": 0}

    def on_layer(step) -> None:
        targeted = step.linears(targets, ignore)
        if not targeted:
            return
        chosen = awq_layer(step, targeted, bits=bits, group_size=group_size, symmetric=symmetric, n_grid=n_grid,
                           clip=clip, quantizer=quantizer, search_chunks=search_chunks, gptq_options=gptq_options)
        alphas.extend(chosen.values())
        count["layers"] += len(targeted)

    tokens = calibrate_layers(model, input_ids, on_layer, batch_size=batch_size, device=device, autocast=autocast,
                              description=f"awq w{bits} g{group_size}")
    return {"quantized_layers": count["layers"], "calibration_tokens": tokens,
            "mean_alpha": sum(alphas) / max(len(alphas), 1)}
