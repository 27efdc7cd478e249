"""Speculative decoding against the best plain greedy decode on a GPU, on several prompts (issue 6).

    python scripts/bench_spec_gpu.py TARGET DRAFT [--k 3 4 6] [--prompts 4] [--gen-len 256]

TARGET and DRAFT are bench sources (a GGUF, a run directory, an export; DRAFT may be an EAGLE
head's folder or a run holding one in draft/). For each prompt (cut from
Persuasion at seeded offsets) it measures, after a warm-up:
  * plain: effopt's decode, one CUDA-graph replay and one host sync per token;
  * plain, rollout R: the same greedy tokens, R steps per replay with the argmax fed back on the
    device (graphs.GreedyRollout), so a speculative speed-up is not just fewer host syncs;
  * speculative k: the draft proposes k tokens in one rollout replay, the target verifies k + 1.
and the cost of the target's forward over T = 1 and T = k + 1 tokens (what a verify pass costs).
Prints the tables (tokens/s summed over prompts) last; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effopt.bench import load, load_draft, make_prompts  # noqa: E402
from effopt.generation import Decoder, Sampling  # noqa: E402
from effopt.generation.decode import prefill, sync  # noqa: E402
from effopt.generation.graphs import GreedyRollout  # noqa: E402
from effopt.generation.measure import effopt_run, speculative_run  # noqa: E402


@torch.inference_mode()
def rollout_run(model, prompt: list[int], gen_len: int, chunk: int) -> dict:
    """Plain greedy decode, `chunk` tokens per graph replay."""
    dec = Decoder(model)
    cache = dec.new_cache("bf16", 1, len(prompt) + gen_len + chunk + 1)
    first = int(prefill(dec, cache, prompt).argmax())
    roll = GreedyRollout(dec, cache, chunk, cache.max_len - chunk)
    sync(dec.device)
    t0 = time.perf_counter()
    tokens, pos = [first], len(prompt)
    while len(tokens) < gen_len:
        tokens += roll(tokens[-1], pos)
        pos += chunk
    sync(dec.device)
    return {"tokens": tokens[:gen_len], "decode_tokens_per_s": (len(tokens) - 1) / (time.perf_counter() - t0)}


@torch.inference_mode()
def step_ms(model, position: int, t: int, replays: int = 200) -> float:
    """Milliseconds of one target forward over t tokens at `position` (a CUDA-graph replay, as a
    speculative verify pass of k = t - 1 drafts runs)."""
    from effopt.generation.graphs import GraphStep

    dec = Decoder(model)
    cache = dec.new_cache("bf16", 1, position + 2 * t + 8)
    step = GraphStep(dec, cache, 1, t, cache.max_len - t)
    tokens = torch.zeros(1, t, dtype=torch.long, device=dec.device)
    start = torch.tensor([position], device=dec.device)
    for _ in range(10):
        step(tokens, start)
    sync(dec.device)
    t0 = time.perf_counter()
    for _ in range(replays):
        step(tokens, start)
    sync(dec.device)
    return (time.perf_counter() - t0) / replays * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 4, 6])
    parser.add_argument("--rollout", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    target, tokenizer, _ = load(args.target)
    draft = load_draft(args.draft, target)  # a model, or an EAGLE head bound to target
    prompts = [make_prompts(tokenizer, target.config.vocab_size, 1, args.prompt_len, seed)[0]
               for seed in range(args.prompts)]
    rows: dict[str, dict] = {}

    def add(name: str, run: dict, ref: list[int] | None) -> None:
        row = rows.setdefault(name, {"tokens": 0, "seconds": 0.0, "same_as_plain": 0, "accepted": [], "per_call": []})
        out = run["tokens"][0] if isinstance(run["tokens"][0], list) else run["tokens"]  # batch runs nest rows
        n = len(out) - 1  # the first token comes from the prefill
        row["tokens"] += n
        row["seconds"] += n / run["decode_tokens_per_s"]
        row["same_as_plain"] += int(ref is None or out == ref)
        if "acceptance_rate" in run:
            row["accepted"].append(run["acceptance_rate"])
            row["per_call"].append(run["tokens_per_target_call"])

    for prompt in prompts:
        plain = effopt_run(target, [prompt], args.gen_len, "bf16")
        ref = plain["tokens"][0]
        add("plain (graph per token)", plain, None)
        rollout_run(target, prompt, args.gen_len, args.rollout)  # warm-up
        add(f"plain, rollout {args.rollout}", rollout_run(target, prompt, args.gen_len, args.rollout), ref)
        for k in args.k:
            add(f"speculative k={k}", speculative_run(target, draft, prompt, args.gen_len, k, Sampling(), "bf16"), ref)

    from effopt.nn import kv_cache

    position = args.prompt_len + args.gen_len // 2
    costs = {f"T = {t}": step_ms(target, position, t) for t in [1] + [k + 1 for k in args.k]}
    kernel_t, kv_cache.MAX_KERNEL_T = kv_cache.MAX_KERNEL_T, 1  # T > 1 through SDPA, as before the T-token kernel
    costs.update({f"T = {k + 1}, SDPA attention": step_ms(target, position, k + 1) for k in args.k})
    kv_cache.MAX_KERNEL_T = kernel_t
    print("\n| target forward over T tokens (graph replay) | ms | x T = 1 |")
    print("|---|---|---|")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.3f} | {ms / costs['T = 1']:.2f} |")

    base = rows["plain (graph per token)"]["tokens"] / rows["plain (graph per token)"]["seconds"]
    best = max(r["tokens"] / r["seconds"] for n, r in rows.items() if n.startswith("plain"))
    print("\n| run | tok/s | x plain | x best plain | acceptance | tokens / target call | same tokens as plain |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        rate = r["tokens"] / r["seconds"]
        r.update(tokens_per_s=rate, speedup=rate / base, speedup_vs_best_plain=rate / best)
        acc = f"{sum(r['accepted']) / len(r['accepted']):.3f}" if r["accepted"] else "-"
        per = f"{sum(r['per_call']) / len(r['per_call']):.2f}" if r["per_call"] else "-"
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {rate / best:.2f} | {acc} | {per} | "
              f"{r['same_as_plain']}/{len(prompts)} |")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                        "step_ms": costs}, indent=1))


if __name__ == "__main__":
    main()
