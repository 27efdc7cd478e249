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

The grid need not be integer groups: with `grid="nf4"` the search, the clipping (blocks clamped to
+-r * absmax, so bitsandbytes' own absmax becomes the clipped range) and the final layers are
bitsandbytes NF4 (blocks of 64 by default), i.e. AWQ's scales make a checkpoint any bitsandbytes
runtime loads; the final rounding is bitsandbytes' own (rtn) or GPTQ on the NF4 levels with the
clipped blocks' absmax fixed (gptq, bnb.nf4_gptq).

Cost: the search re-runs the inspected block once per alpha on `search_samples` sequences. When
the inspected block is the scaled linear itself (o_proj, down_proj) its loss needs no forward:
mean((x dW^T)^2) = tr(dW G dW^T) / (tokens * rows) with G = X^T X of the search tokens, computed
once, so each grid point costs a [N, K] x [K, K] product instead of a pass over the tokens. The
other blocks' forwards (reference and candidates) run under bfloat16 autocast by default
(`search_autocast`): on SmolLM2 W4 g128 that halved the time at the same perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from effopt.methods.calibration import SharedInputs
from effopt.methods.quant import bnb
from effopt.methods.quant.clip import block_gram, diag_blocks
from effopt.methods.quant.grids import IntGrid, Nf4Grid

GRIDS = ("int", "nf4")
QUANTIZERS = ("rtn", "gptq")


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
def block_loss(inspect, inputs: list[torch.Tensor]) -> Callable[[], float]:
    """loss() = mean squared difference between the inspected block's output now and its output
    when this was called (the float reference), averaged over the input chunks.

    Args:
        inspect: callable(x, chunk index) -> output of the block.
        inputs: input chunks of the block.
    """
    reference = [inspect(x, i).float() for i, x in enumerate(inputs)]

    @torch.no_grad()
    def loss() -> float:
        return sum(float((inspect(x, i).float() - ref).pow(2).mean()) for i, (x, ref) in
                   enumerate(zip(inputs, reference))) / len(inputs)
    return loss


@torch.no_grad()
def linear_loss(linear: torch.nn.Module, inputs: list[torch.Tensor]) -> Callable[[], float]:
    """The same loss when the inspected block is `linear` itself, without running it: its output
    changes by x dW^T, so the mean squared change is tr(dW G dW^T) / (tokens * rows), G = X^T X."""
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in inputs]).float()
    gram, tokens = x.T @ x, x.shape[0]
    original = linear.weight.detach().float().clone()

    @torch.no_grad()
    def loss() -> float:
        dw = linear.weight.float() - original
        return float((dw @ gram).mul_(dw).sum()) / (tokens * dw.shape[0])
    return loss


@torch.no_grad()
def search_scale(linears: dict[str, torch.nn.Module], quantized: set[str], loss: Callable[[], float],
                 x_mean: torch.Tensor, grid, n_grid: int = 20):
    """Grid-search alpha; returns (best scales, best alpha, {alpha: loss}).

    Args:
        linears: every consumer of the shared input (all get W * s; only those in `quantized` are
            fake-quantized, the rest stay float).
        loss: () -> output error with the linears' current weights (`block_loss`, `linear_loss`).
        x_mean: per-channel mean |x| over all calibration tokens.
        grid: IntGrid or Nf4Grid, the weights' quantization grid.
    """
    originals = {name: m.weight.detach().clone() for name, m in linears.items()}
    losses, best = {}, (float("inf"), 0.0, torch.ones_like(x_mean, dtype=torch.float32))
    try:
        for step in range(n_grid):
            alpha = step / n_grid
            s = awq_scales(x_mean, alpha).view(1, -1)
            for name, m in linears.items():
                if name in quantized:
                    m.weight.copy_(grid.fake_quantize(originals[name].float() * s).div_(s))
            losses[alpha] = loss()
            if losses[alpha] < best[0]:
                best = (losses[alpha], alpha, s.view(-1))
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
            if self.gram is None:
                self.gram = torch.zeros(xf.shape[1], xf.shape[1], device=xf.device)
            self.gram.addmm_(xf.T, xf)
        elif self.block_size is not None:
            g = block_gram(xf, self.block_size)
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


def _inspector(step, name: str, autocast: torch.dtype | None = None):
    """callable(x, chunk) -> output of module `name` of the layer (attention gets the layer's kwargs),
    under torch.autocast with `autocast` if given, else with the step's own setting."""
    module = step.layer.get_submodule(name)
    takes_kwargs = name.endswith("self_attn") or name.endswith("attention")

    def run(x: torch.Tensor, chunk: int) -> torch.Tensor:
        with torch.autocast(step.device.type, dtype=autocast) if autocast else step.autocast_context():
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


def _final_layer(module: torch.nn.Module, w: torch.Tensor, grid, quantizer: str, gram, tokens: int,
                 gptq_options: dict | None) -> torch.nn.Module:
    """The quantized replacement of `module` for its (scaled, clipped, masked) weight `w`: a
    QuantLinear (IntGrid) or a bitsandbytes NF4 layer (Nf4Grid), rounded by RTN or GPTQ."""
    from effopt.methods.quant.gptq import gptq_quantize, quantized_layer
    from effopt.methods.quant.rtn import quantize_weight

    mask = getattr(module, "weight_mask", None)
    if isinstance(grid, Nf4Grid):
        if quantizer == "rtn":
            return bnb.quantize_linear(module, w, "nf4", blocksize=grid.blocksize)
        opts = gptq_options or {}
        codes, absmax = bnb.nf4_gptq(w, gram, grid.blocksize, opts.get("percdamp", 0.01),
                                     opts.get("act_order", False), mask=mask)
        return bnb.nf4_layer_from_codes(module, codes, absmax, grid.blocksize)
    bits, group_size, symmetric = grid.bits, grid.group_size, grid.symmetric
    if quantizer == "gptq":
        codes, scales, zeros, _ = gptq_quantize(w, 2 * gram / max(tokens, 1), bits, group_size, symmetric,
                                                mask=mask, **(gptq_options or {}))
    else:
        codes, scales, zeros = quantize_weight(w, bits, group_size, symmetric)
    return quantized_layer(module, codes, scales, zeros, bits, group_size, symmetric, "awq")


@torch.no_grad()
def awq_layer(step, targeted: dict[str, torch.nn.Module], *, grid, n_grid: int = 20, clip: bool = True,
              quantizer: str = "rtn", search_chunks: int = 1, search_autocast: torch.dtype | None = None,
              gptq_options: dict | None = None) -> dict:
    """AWQ on one decoder layer (a calibration LayerStep): search and fold scales, clip, quantize.

    As in the reference implementation, the next layer is calibrated on this layer's float outputs
    (computed in the same pass that gathers the statistics).

    Args:
        grid: IntGrid or Nf4Grid.
        quantizer: 'rtn' or 'gptq', the final rounding on that grid.

    Returns {linear name: chosen alpha} for the scaled groups.
    """
    groups = scale_groups(step.layer)
    names = sorted({n for grp in groups for n in grp.linears} | set(targeted))
    stats, step.next_inputs = collect_stats(step, names, search_chunks, quantizer == "gptq",
                                            grid.block if clip else None)
    applied: dict[str, torch.Tensor] = {}
    alphas = {}
    for grp in groups:
        quantized = {n for n in grp.linears if n in targeted}
        if not quantized:
            continue
        linears = {n: step.layer.get_submodule(n) for n in grp.linears}
        st = stats[grp.linears[0]]
        if grp.linears == [grp.inspect]:
            loss = linear_loss(linears[grp.inspect], st.kept)
        else:
            loss = block_loss(_inspector(step, grp.inspect, search_autocast), st.kept)
        s, alpha, _ = search_scale(linears, quantized, loss, st.mean_abs(), grid, n_grid)
        fold_scales(step.layer.get_submodule(grp.prev), list(linears.values()), s)
        applied.update({n: s for n in grp.linears})
        alphas.update({n: alpha for n in quantized})
    for st in stats.values():
        st.kept = []
    for name, module in targeted.items():
        gram = stats[name].gram
        if gram is not None and name in applied:
            gram = _rescale_gram(gram, applied[name], grid.block)
        weight = module.weight.data
        if clip and not name.endswith(("q_proj", "k_proj")):
            blocks = gram if gram.dim() == 3 else diag_blocks(gram, grid.block)
            grid.apply_clip(weight, grid.search_clip(weight, blocks))
        mask = getattr(module, "weight_mask", None)
        w = weight * mask if mask is not None else weight
        step.replace(name, _final_layer(module, w, grid, quantizer, gram, stats[name].tokens, gptq_options))
    return alphas


@torch.no_grad()
def awq_model(model: torch.nn.Module, input_ids: torch.Tensor, targets: list[str], ignore: list[str], *,
              bits: int = 4, group_size: int = 128, symmetric: bool = False, n_grid: int = 20, clip: bool = True,
              grid: str = "int", quantizer: str = "rtn", blocksize: int = 64, search_samples: int = 8,
              search_autocast: torch.dtype | None = torch.bfloat16, batch_size: int = 8,
              gptq_options: dict | None = None, autocast: torch.dtype | None = None, device=None) -> dict:
    """AWQ over every decoder layer in order (each layer calibrated on the float outputs of the layer
    before it, as in the reference implementation; see `awq_layer`).

    Args:
        grid: 'int' (bits, group_size, symmetric; QuantLinear) or 'nf4' (bitsandbytes NF4 with
            `blocksize` weights per absmax, throughout: search, clipping and the stored layers).
        bits, group_size, symmetric: the integer grid.
        quantizer: 'rtn' or 'gptq', the final rounding on the grid.
        blocksize: weights per NF4 absmax block; clipping and GPTQ need every targeted layer's
            input width to be a multiple of it.
        search_samples: calibration sequences the scale search's loss is measured on (the mean |x|
            statistics and the clipping search use every sequence).
        search_autocast: dtype of the search's block forwards (None: as the other calibration
            forwards, `autocast`).
        gptq_options: percdamp / blocksize / act_order for the GPTQ quantizer (percdamp and
            act_order on the NF4 grid).
    """
    from effopt.methods.calibration import calibrate_layers

    if grid not in GRIDS or quantizer not in QUANTIZERS:
        raise ValueError(f"grid must be one of {GRIDS} and quantizer one of {QUANTIZERS}, got {grid!r}, "
                         f"{quantizer!r}")
    label = f"awq nf4 b{blocksize}" if grid == "nf4" else f"awq w{bits} g{group_size}"
    grid = Nf4Grid(blocksize) if grid == "nf4" else IntGrid(bits, group_size, symmetric)
    if isinstance(grid, Nf4Grid):
        param = next(model.parameters())
        bnb.check_backend("nf4", torch.device(device) if device is not None else param.device, param.dtype)
    search_chunks = max(1, -(-search_samples // batch_size))
    alphas: list[float] = []
    count = {"layers": 0}

    def on_layer(step) -> None:
        targeted = step.linears(targets, ignore)
        if not targeted:
            return
        chosen = awq_layer(step, targeted, grid=grid, n_grid=n_grid, clip=clip, quantizer=quantizer,
                           search_chunks=search_chunks, search_autocast=search_autocast,
                           gptq_options=gptq_options)
        alphas.extend(chosen.values())
        count["layers"] += len(targeted)

    tokens = calibrate_layers(model, input_ids, on_layer, batch_size=batch_size, device=device, autocast=autocast,
                              description=label)
    return {"quantized_layers": count["layers"], "calibration_tokens": tokens,
            "mean_alpha": sum(alphas) / max(len(alphas), 1)}
