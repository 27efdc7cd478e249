"""Learned masks: one hard-concrete gate per weight with an L0 penalty (Louizos et al., 2018).

Each gate z = min(1, max(0, s * (zeta - gamma) + gamma)) with s = sigmoid((logit(u) + log_alpha) / beta),
u ~ U(0, 1), beta = 2/3, gamma = -0.1, zeta = 1.1; the expected L0 norm is
sum sigmoid(log_alpha - beta * log(-gamma / zeta)). The weights stay frozen; only log_alpha trains,
on the language-modelling loss of calibration text. The penalty drives the expected sparsity to the
target through a Lagrangian, lambda1 (s - t) + lambda2 (s - t)^2 with the multipliers trained by
gradient ascent and t ramped up over the first half of training (Wang et al., 2020). After
training, the gates are thresholded: per layer (or per N:M group) the lowest log_alpha are pruned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effopt import log
from effopt.nn import set_submodule
from effopt.nn.masked_linear import effective_weight

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


class HardConcreteGate(torch.nn.Module):
    """A tensor of hard-concrete gates with trainable log_alpha."""

    def __init__(self, shape: torch.Size, init_keep: float = 0.99, device=None):
        super().__init__()
        init = math.log(init_keep / (1 - init_keep))
        self.log_alpha = torch.nn.Parameter(torch.full(shape, init, dtype=torch.float32, device=device))

    def sample(self) -> torch.Tensor:
        """A stochastic gate tensor in [0, 1] (exact zeros and ones have non-zero probability)."""
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def open_probability(self) -> torch.Tensor:
        """P(z != 0) per gate: the expected L0 norm's terms."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


class GatedLinear(torch.nn.Module):
    """A frozen linear layer whose weight is multiplied by sampled gates (training only)."""

    def __init__(self, linear: torch.nn.Module, init_keep: float):
        super().__init__()
        self.linear = linear
        self.gate = HardConcreteGate(linear.weight.shape, init_keep, linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = effective_weight(self.linear).detach()
        return F.linear(x, w * self.gate.sample().to(w.dtype), self.linear.bias)


def _expected_sparsity(gated: dict[str, GatedLinear]) -> torch.Tensor:
    opened = sum(g.gate.open_probability().sum() for g in gated.values())
    total = sum(g.gate.log_alpha.numel() for g in gated.values())
    return 1 - opened / total


def _lagrangian_step(model, gated: dict[str, GatedLinear], batch: torch.Tensor, target: float,
                     lambdas: torch.nn.Parameter, optimizers: tuple) -> dict:
    """One step: descent on the gates, ascent on the multipliers; returns the step's figures."""
    lm = model(input_ids=batch, labels=batch, use_cache=False).loss
    gap = _expected_sparsity(gated) - target
    loss = lm + lambdas[0] * gap + lambdas[1] * gap * gap
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    lambdas.grad.neg_()
    for opt in optimizers:
        opt.step()
    return {"final_lm_loss": lm.item(), "expected_sparsity": (gap + target).item()}


def train_gates(model: torch.nn.Module, modules: dict[str, torch.nn.Module], samples: torch.Tensor,
                target: float, steps: int = 300, batch_size: int = 1, lr: float = 0.05,
                lambda_lr: float = 0.05, init_keep: float = 0.99) -> tuple[dict[str, torch.Tensor], dict]:
    """Train hard-concrete gates on the named linears; return ({name: log_alpha}, training stats).

    Args:
        samples: calibration token ids [n, seq]; batches cycle through them.
        target: the sparsity the Lagrangian drives the expected sparsity to.
        steps, batch_size, lr: gate training (Adam on log_alpha).
        lambda_lr: step size of the multipliers' gradient ascent.
        init_keep: initial sigmoid(log_alpha), close to 1 so training starts from the dense model.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    gated = {name: GatedLinear(m, init_keep) for name, m in modules.items()}
    lambdas = torch.nn.Parameter(torch.zeros(2))
    optimizers = (torch.optim.Adam([g.gate.log_alpha for g in gated.values()], lr=lr),
                  torch.optim.SGD([lambdas], lr=lambda_lr))
    device = next(model.parameters()).device
    stats: dict = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, g in gated.items():
            set_submodule(model, name, g)
        for step in log.progress(range(steps), "training L0 gates"):
            idx = torch.arange(step * batch_size, (step + 1) * batch_size) % samples.shape[0]
            ramp = target * min(1.0, (step + 1) / max(1, steps // 2))
            stats = _lagrangian_step(model, gated, samples[idx].to(device), ramp, lambdas, optimizers)
    finally:
        for name, g in gated.items():
            set_submodule(model, name, g.linear)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: g.gate.log_alpha.detach() for name, g in gated.items()}, stats
