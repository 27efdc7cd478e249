"""Response distillation (sequence-level KD, Kim & Rush 2016): the teacher writes continuations of
prompts and the student is trained on them with cross-entropy on the generated tokens."""

from __future__ import annotations

import torch


@torch.no_grad()
def teacher_responses(teacher: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                      pad_token_id: int = 0) -> dict:
    """Generate `new_tokens` tokens after each prompt row; return {"input_ids", "labels"} where
    labels are -100 on prompt tokens (only the teacher's tokens are learned).

    Args:
        prompts: [n, P] token ids (equal length, no padding).
        sample: sample (with temperature / top_p) instead of greedy decoding.
    """
    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    teacher.eval()
    rows = []
    for start in range(0, prompts.shape[0], batch_size):
        chunk = prompts[start: start + batch_size].to(device)
        kwargs = dict(do_sample=sample, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
        out = teacher.generate(chunk, attention_mask=torch.ones_like(chunk), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, pad_token_id=pad_token_id, **kwargs)
        rows.append(out[:, : chunk.shape[1] + new_tokens].cpu())
    ids = torch.cat(rows)
    labels = ids.clone()
    labels[:, : prompts.shape[1]] = -100
    return {"input_ids": ids, "labels": labels}
