"""GPU sanity check of EAGLE speculative decoding (no model download): a random tiny Llama in bf16,
greedy rounds replayed from one CUDA graph against the same rounds run eagerly, and both against
plain greedy decoding. Prints one line per prompt; exits 1 when graph and eager tokens differ.

    python scripts/check_eagle_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from effopt.generation import generate  # noqa: E402
from effopt.generation.eagle import eagle_generate  # noqa: E402
from effopt.methods.distill.eagle import EagleHead  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    target = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)  # context-dependent continuations (a plain random model repeats a token)
    head = EagleHead(target)
    with torch.no_grad():
        head.fc.weight.add_(torch.randn_like(head.fc.weight) * 0.05)
    bad = 0
    for seed in range(4):
        ids = torch.randint(3, 500, (12 + 5 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = generate(target, [ids], 48).tokens[0]
        for k in (3, 5):
            g = eagle_generate(target, head, ids, 48, k=k, graph=True)
            e = eagle_generate(target, head, ids, 48, k=k, graph=False)
            same = g.tokens == e.tokens and g.accepted == e.accepted
            bad += not same
            print(f"prompt {seed} k={k}: graph==eager {same}, ==plain {g.tokens == plain} "
                  f"(common prefix {next((i for i, (a, b) in enumerate(zip(g.tokens, plain)) if a != b), 48)}), "
                  f"acceptance {g.acceptance_rate:.3f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
