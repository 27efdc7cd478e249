"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) through peft.

Both leave the base weights untouched and learn virtual tokens: prompt tuning prepends trainable
input embeddings; prefix tuning learns per-layer key/value prefixes. They live in a peft model
wrapper (the sequence the model sees is longer), so the trained result is a peft adapter folder
applied with `peft.PeftModel.from_pretrained(base, folder)`; effopt's own model stays the base.
"""

from __future__ import annotations

import math

import torch


def add_prompt_learning(model: torch.nn.Module, kind: str, num_virtual_tokens: int, init: str = "sample_vocab",
                        prefix_projection: bool = False, projection_hidden: int = 0):
    """Wrap `model` in a peft prompt-learning model (only the virtual tokens train).

    Args:
        kind: "prompt_tuning" or "prefix_tuning".
        init: prompt tuning's initialisation: "sample_vocab" (embeddings of random vocabulary tokens,
            the paper's recommendation) or "random".
        prefix_projection: prefix tuning's reparameterisation through an MLP (the paper's trick for
            stable training); projection_hidden is its width.
    """
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    if kind == "prompt_tuning":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB if init == "sample_vocab"
                                    else PromptTuningInit.RANDOM)
    elif kind == "prefix_tuning":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                    prefix_projection=prefix_projection,
                                    encoder_hidden_size=projection_hidden or model.config.hidden_size)
    else:
        raise ValueError(f"unknown prompt-learning kind {kind!r}")
    return get_peft_model(model, config)


@torch.no_grad()
def adapter_perplexity(peft_model, windows: list[torch.Tensor]) -> dict:
    """Perplexity of a peft model on eval windows under effopt's protocol (first token of a window
    is context only), scored through the labels so virtual-token positions are excluded."""
    device = next(p for p in peft_model.parameters()).device
    total, count = 0.0, 0
    peft_model.eval()
    for window in windows:
        ids = window.unsqueeze(0).to(device)
        loss = peft_model(input_ids=ids, labels=ids).loss.float()
        n = ids.shape[1] - 1
        total += float(loss) * n
        count += n
    return {"perplexity": math.exp(total / count), "nll": total / count, "eval_tokens": count}
