"""MeZO: memory-efficient zeroth-order optimization (Malladi et al., 2023, Algorithm 1).

Each step samples a seed s, perturbs every trainable parameter in place by +eps*z (z ~ N(0, I)
regenerated from s, never stored), measures the loss, moves to -eps*z, measures again, restores,
and updates theta <- theta - lr * (g * z + weight_decay * theta) with the projected gradient
g = (loss+ - loss-) / (2 eps). Only forward passes run, so no activations or gradients are kept:
memory is that of inference. Under torch.distributed every process uses the same seeds and the
projected gradient is averaged over processes, so all replicas take the same step.
"""

from __future__ import annotations

from typing import Callable

import torch


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO-SGD). `step(closure)` needs a closure returning the loss (no backward)."""

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.param_groups[0].setdefault("mezo_seed", seed)
        self.param_groups[0].setdefault("mezo_step", 0)

    def _step_seed(self) -> int:
        group = self.param_groups[0]
        return (int(group["mezo_seed"]) * 1_000_003 + int(group["mezo_step"])) % (2**62)

    def _perturb(self, seed: int, scale: float) -> None:
        """theta += scale * z for every parameter, z drawn from `seed` in a fixed parameter order."""
        gens: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                z = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
                p.data.add_(z.to(p.dtype), alpha=scale)

    def _update(self, seed: int, projected_grad: float) -> None:
        gens: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                z = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
                if group["weight_decay"]:
                    p.data.mul_(1 - group["lr"] * group["weight_decay"])
                p.data.add_(z.to(p.dtype), alpha=-group["lr"] * projected_grad)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One MeZO step; returns the mean of the two measured losses."""
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss")
        seed, eps = self._step_seed(), self.param_groups[0]["eps"]
        self._perturb(seed, eps)
        loss_pos = closure().detach().double()
        self._perturb(seed, -2 * eps)
        loss_neg = closure().detach().double()
        self._perturb(seed, eps)
        diff = torch.stack([loss_pos - loss_neg, loss_pos + loss_neg])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(diff)
            diff /= torch.distributed.get_world_size()
        self._update(seed, float(diff[0]) / (2 * eps))
        self.param_groups[0]["mezo_step"] += 1
        return (diff[1] / 2).float()
