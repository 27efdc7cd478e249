"""Optimizers and learning-rate schedules, from torch, bitsandbytes and transformers.

Only MeZO (effopt.training.mezo) is written here: none of those libraries has it.
"""

from __future__ import annotations

import torch


def build_optimizer(params: list[torch.nn.Parameter], opts) -> torch.optim.Optimizer:
    """The optimizer named by `opts.optimizer` over `params` (a list of trainable parameters).

    adamw, adafactor and sgd are torch's; lion and adamw8bit (block-wise 8-bit states) are
    bitsandbytes'; mezo is effopt's zeroth-order optimizer.
    """
    name, lr, wd = opts.optimizer, opts.lr, opts.weight_decay
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(opts.betas), weight_decay=wd)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "mezo":
        from effopt.training.mezo import MeZO

        return MeZO(params, lr=lr, eps=opts.mezo_eps, weight_decay=wd)
    import bitsandbytes as bnb

    if name == "lion":
        return bnb.optim.Lion(params, lr=lr, betas=tuple(opts.betas), weight_decay=wd)
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(opts.betas), weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, opts):
    """Linear warmup for `opts.warmup_steps`, then constant, linear or cosine decay to 0 at `opts.steps`."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[opts.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=opts.warmup_steps, num_training_steps=opts.steps)
