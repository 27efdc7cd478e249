"""Training tasks: modules that turn a batch into a loss (what the loop optimizes)."""

from __future__ import annotations

import torch


def enforce_masks(model: torch.nn.Module) -> None:
    """Zero every pruned weight of every MaskedLinear again (an optimizer step must not regrow it).

    Weights sharded by FSDP are skipped (their masked entries get zero gradients, which leave them
    at zero under every gradient optimizer); the loop enforces again once they are gathered."""
    from torch.distributed.tensor import DTensor

    from effopt.nn.masked_linear import MaskedLinear

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MaskedLinear) and module.weight.requires_grad \
                    and not isinstance(module.weight, DTensor):
                module.weight.mul_(module.weight_mask.to(module.weight.dtype))


class CausalLMTask(torch.nn.Module):
    """Next-token cross-entropy of `model` on batch["input_ids"] (batch["labels"] when given; -100 =
    not predicted). Works for plain and peft-wrapped models (prompt tuning lengthens the logits;
    peft pads the labels to match)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        return self.model(input_ids=ids, labels=labels, use_cache=False).loss

    def after_step(self) -> None:
        """Keep pruned weights at zero."""
        enforce_masks(self.model)
