"""Inference benchmark: Llama-3-8B shapes with random weights on a GPU, or a builtin model on CPU.

    python scripts/bench_inference.py llama8b [--tiny] [--gen-len 128] [--hf-gen-len 32] [--compile]
    python scripts/bench_inference.py builtin [--source builtin:smollm2-135m] [--gen-len 64]

`llama8b` builds LlamaForCausalLM from Llama-3-8B's config (bf16, random weights: speed does not
depend on their values), then times, on one 128-token prompt at batch 1: plain transformers
`generate`; effopt's decode path (static KV cache, CUDA graph of the whole step, with and without
kernels/, with fused projections, optionally torch.compile); W4 weights (RTN, group 128, packed
QuantLinear, Triton qmatmul); speculative decoding of the bf16 model with the W4 model as draft,
against transformers' assisted generation. `--tiny` runs the same flow on a tiny config (CPU check).

`builtin` runs effopt.bench.run_bench on the builtin model (plain, int8/int4 KV cache) and
speculative decoding with compressed drafts built in-process.
Prints a table last; writes JSON to $OUT (or --out) when set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effopt.generation import Decoder, Sampling  # noqa: E402
from effopt.generation.measure import common_prefix, effopt_run, hf_generate_run, speculative_run  # noqa: E402
from effopt.nn import kv_cache  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def build_llama(shapes: dict, device: str, dtype: torch.dtype):
    """A random-weight LlamaForCausalLM built directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shapes)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


@torch.no_grad()
def quantize_rtn(model, bits: int = 4, group_size: int = 128, head_bits: int | None = None):
    """RTN (asymmetric, grouped) on every decoder linear layer, packed as QuantLinear, in place; with
    `head_bits`, lm_head too, per channel (it unties a tied embedding: fine for a draft)."""
    from effopt.methods.quant.rtn import quantize_weight
    from effopt.nn import set_submodule
    from effopt.nn.quant_linear import QuantLinear

    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear
             and ("lm_head" not in n or head_bits)]
    for name in names:
        linear = model.get_submodule(name)
        b, g = (head_bits, linear.in_features) if "lm_head" in name else \
            (bits, group_size if group_size > 0 else linear.in_features)
        codes, scales, zeros = quantize_weight(linear.weight, b, g)
        set_submodule(model, name, QuantLinear.from_codes(codes, scales, zeros, b, g, linear.bias, False,
                                                          linear.weight.dtype))
    return model


class Report:
    """Collects rows; each section runs under a time budget and records its error instead of dying."""

    def __init__(self, budget_s: float, out: str | None = None):
        self.rows: list[dict] = []
        self.t0, self.budget = time.perf_counter(), budget_s
        self.out = Path(out) / "inference_llama8b.json" if out else None

    def section(self, name: str, fn) -> dict | None:
        left = self.budget - (time.perf_counter() - self.t0)
        if left <= 0:
            self.rows.append({"name": name, "skipped": "time budget spent"})
            return None
        t = time.perf_counter()
        try:
            row = {"name": name, **fn()}
        except Exception as exc:  # a benchmark section failing must not hide the others' numbers
            row = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row["section_s"] = round(time.perf_counter() - t, 1)
        tokens = row.pop("tokens", None)
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        if self.out:  # after every section: a run killed at its time limit still leaves its numbers
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.rows, indent=1, default=str))
        return dict(row, tokens=tokens)


def _plain(run: dict, ref_tokens: list[int] | None = None) -> dict:
    out = {k: run[k] for k in ("prefill_s", "ttft_s", "decode_tokens_per_s", "peak_gpu_mb", "peak_host_mb",
                               "kv_cache_bytes", "new_tokens") if k in run}
    out["ms_per_token"] = 1000 / run["decode_tokens_per_s"]
    if ref_tokens is not None:
        out["same_prefix_as_hf"] = common_prefix(run["tokens"][0], ref_tokens)
    out["tokens"] = run["tokens"]
    return out


def run_llama8b(args) -> list[dict]:
    """The GPU benchmark (see module docstring)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    rep = Report(args.budget_s, args.out)
    model = build_llama(TINY if args.tiny else LLAMA3_8B, dev, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    prompts = [prompt.tolist()]
    n, hf_n = args.gen_len, args.hf_gen_len
    hf = rep.section("transformers generate, bf16", lambda: _plain(hf_generate_run(model, prompts, hf_n, 0)))
    ref = hf["tokens"][0] if hf and hf.get("tokens") else []

    def effopt(m, cache="bf16", decoder=None, graph=None, length=n, kernels=True, compile_step=False):
        kv_cache.USE_KERNELS = kernels
        try:
            return _plain(effopt_run(m, prompts, length, cache, decoder=decoder, graph=graph,
                                     compile_step=compile_step), ref)
        finally:
            kv_cache.USE_KERNELS = True

    cont = torch.randint(0, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    rep.section("logits check: effopt graph bf16 vs transformers forward", lambda: logits_check(model, prompts[0],
                                                                                                cont))
    fused = Decoder(model).fuse()
    if args.kv_only:  # the KV-cache rows alone
        rep.section("effopt graph, bf16, kernels, fused qkv/gate-up", lambda: effopt(model, decoder=fused))
        rep.section("effopt graph, bf16, int8 KV cache", lambda: effopt(model, cache="int8", decoder=fused))
        return rep.rows
    if not args.skip_bf16:
        rep.section("effopt eager (no graph), bf16", lambda: effopt(model, graph=False, length=min(n, 32)))
        rep.section("effopt graph, bf16, torch attention", lambda: effopt(model, kernels=False))
        rep.section("effopt graph, bf16, kernels", lambda: effopt(model))
        rep.section("effopt graph, bf16, kernels, fused qkv/gate-up", lambda: effopt(model, decoder=fused))
        rep.section("effopt graph, bf16, int8 KV cache", lambda: effopt(model, cache="int8", decoder=fused))
    w4 = quantize_rtn(copy.deepcopy(model), 4, 128)
    g4 = False if args.no_graph_w4 else None
    rep.section("effopt eager (no graph), W4", lambda: effopt(w4, graph=False, length=min(n, 32)))
    rep.section("logits check: effopt W4 vs transformers forward W4", lambda: logits_check(w4, prompts[0], cont,
                                                                                          graph=g4 is None))
    rep.section(f"effopt {'eager' if g4 is False else 'graph'}, W4 (RTN g128) qmatmul", lambda: effopt(w4, graph=g4))
    w4_fused = Decoder(w4).fuse()
    rep.section(f"effopt {'eager' if g4 is False else 'graph'}, W4, fused", lambda: effopt(w4, decoder=w4_fused,
                                                                                          graph=g4))
    if args.profile:
        rep.section("kernel time per step, bf16 fused (profiler)", lambda: kernel_profile(fused, prompts[0]))
        rep.section("kernel time per step, W4 fused (profiler)", lambda: kernel_profile(w4_fused, prompts[0]))
    rep.section("transformers generate, W4 modules", lambda: _plain(hf_generate_run(w4, prompts, min(hf_n, 16), 0)))
    for k in [] if args.no_spec else args.k:
        rep.section(f"effopt speculative, target bf16, draft W4, k={k}", lambda k=k: _spec(
            speculative_run(model, w4, prompts[0], n, k, Sampling(), "bf16", graph=g4, target_decoder=fused,
                            draft_decoder=w4_fused)))
    if not args.no_spec:
        rep.section("transformers assisted generation, draft W4", lambda: _plain(
            hf_generate_run(model, prompts, hf_n, 0, assistant=w4), ref))
    if args.compile:  # last: compilation time is the least predictable
        rep.section("effopt graph + torch.compile, W4, fused", lambda: effopt(w4, decoder=w4_fused,
                                                                              compile_step=True))
        rep.section("effopt graph + torch.compile, bf16, fused", lambda: effopt(model, decoder=fused,
                                                                                compile_step=True))
    return rep.rows


@torch.inference_mode()
def logits_check(model, prompt: list[int], cont: list[int], decoder=None, graph: bool = True) -> dict:
    """effopt's logits (eager prefill, then graph-replayed steps) against one teacher-forced HF forward.

    Random-weight logits are nearly flat, so greedy tokens flip on bf16 rounding; the logits are
    the test of correctness. Returns max |error|, the reference logits' std, and top-1 agreement.
    """
    from effopt.generation.decode import prefill
    from effopt.generation.graphs import GraphStep

    dev = next(model.parameters()).device
    ref = model(torch.tensor([prompt + cont], device=dev)).logits[0, len(prompt) - 1: -1].float()
    dec = decoder or Decoder(model)
    max_len = len(prompt) + len(cont) + 2
    cache = dec.new_cache("bf16", 1, max_len)
    outs = [prefill(dec, cache, prompt).float()]
    step = GraphStep(dec, cache, 1, 1, max_len - 1) if graph and dev.type == "cuda" else None
    for i, tok in enumerate(cont[:-1]):
        x, s = torch.tensor([[tok]], device=dev), torch.tensor([len(prompt) + i], device=dev)
        logits = step(x, s) if step else dec.forward(x, s, cache, kv_len=len(prompt) + i + 1)
        outs.append(logits[0, -1].float().clone())
    got = torch.stack(outs)
    return {"logits_max_abs_err": (got - ref).abs().max().item(), "logits_ref_std": ref.std().item(),
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


@torch.inference_mode()
def kernel_profile(decoder, prompt: list[int], steps: int = 8, top: int = 12) -> dict:
    """GPU time per decode step by kernel (eager steps under torch.profiler): what a CUDA graph of the
    step cannot go below, and where it goes. Names are cut to 60 characters."""
    from effopt.generation.decode import prefill

    cache = decoder.new_cache("bf16", 1, len(prompt) + steps + 8)
    prefill(decoder, cache, prompt)
    dev = decoder.device
    x = torch.tensor([[1]], device=dev)
    pos = len(prompt)
    for i in range(3):  # warm-up (and the qmatmul tuner)
        decoder.forward(x, torch.tensor([pos + i], device=dev), cache, kv_len=pos + i + 1)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            decoder.forward(x, torch.tensor([pos + 3 + i], device=dev), cache, kv_len=pos + 4 + i)
        torch.cuda.synchronize()
    per: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            slot = per.setdefault(ev.name[:60], [0.0, 0])
            slot[0] += ev.device_time / steps
            slot[1] += 1 / steps
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    return {"gpu_us_per_step": round(sum(v[0] for v in per.values()), 1),
            "launches_per_step": round(sum(v[1] for v in per.values())),
            "top_kernels_us": {k: [round(v[0], 1), round(v[1], 1)] for k, v in rows[:top]}}


def _spec(run: dict) -> dict:
    out = _plain(run)
    out.update({k: run[k] for k in ("acceptance_rate", "tokens_per_target_call", "target_calls", "draft_calls")})
    return out


def run_builtin(args) -> list[dict]:
    """run_bench on the builtin model (int8 and int4 KV, a batch of 4), then speculative decoding
    with compressed drafts built in-process; rows are saved after each step."""
    from effopt.bench import load, make_prompts, run_bench, to_markdown

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load(args.source)
    rows = []

    def save(row):
        rows.append(row)
        print(row.get("markdown") or json.dumps(row, default=str), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "inference_builtin.json").write_text(json.dumps(rows, indent=1, default=str))

    common = dict(models={"source": model, "tokenizer": tokenizer}, gen_len=args.gen_len, prompt_len=args.prompt_len)
    for kv, batch, ppl in [] if args.spec_only else (("int8", 1, args.ppl_tokens), ("int4", 1, args.ppl_tokens),
                                                     ("bf16", 4, 0)):
        res = run_bench(args.source, kv_cache=kv, batch=batch, ppl_tokens=ppl, **common)
        save({"name": f"run_bench kv {kv} batch {batch}", "result": res, "markdown": to_markdown(res)})
    prompts = make_prompts(tokenizer, model.config.vocab_size, 1, args.prompt_len, 0)
    plain = effopt_run(model, prompts, args.gen_len, "bf16")
    for label, draft in _cpu_drafts(model):
        alone = effopt_run(draft, prompts, args.gen_len, "bf16")
        save({"name": f"draft alone: {label}", "decode_tokens_per_s": alone["decode_tokens_per_s"],
              "plain_tokens_per_s": plain["decode_tokens_per_s"]})
        for k in args.k:
            run = speculative_run(model, draft, prompts[0], args.gen_len, k, Sampling(), "bf16")
            row = {"name": f"speculative, draft {label}, k={k}", **_spec(run),
                   "plain_tokens_per_s": plain["decode_tokens_per_s"],
                   "speedup": run["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
                   "identical": run["tokens"][0] == plain["tokens"][0]}
            row.pop("tokens")
            save(row)
    return rows


def _cpu_drafts(model):
    """Compressed drafts of `model`: a bf16 copy (half the bytes per weight), and RTN W8 per channel and
    W4 g128 QuantLinear models with an int8 lm_head (torch's int8/int4 CPU matmuls; effopt.nn.cpu_qmatmul)."""
    yield "bf16 copy", copy.deepcopy(model).to(torch.bfloat16)
    yield "RTN W8 per channel, lm_head W8", quantize_rtn(copy.deepcopy(model), 8, -1, head_bits=8)
    yield "RTN W4 g128, lm_head W8", quantize_rtn(copy.deepcopy(model), 4, 128, head_bits=8)


def print_table(rows: list[dict]) -> None:
    """The short table the device reply ends with."""
    print("\n| run | decode tok/s | ms/token | prefill s | TTFT s | peak GPU MB | accept | tok/call | HF prefix |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "top1_agreement" in r:
            print(f"| {r['name']} | max abs err {r['logits_max_abs_err']:.3g}, ref std {r['logits_ref_std']:.3g}, "
                  f"top-1 agreement {r['top1_agreement']:.3g} |")
            continue
        if "decode_tokens_per_s" not in r:
            print(f"| {r['name']} | {r.get('error') or r.get('skipped') or '-'} |")
            continue
        cells = [r.get("decode_tokens_per_s"), r.get("ms_per_token"), r.get("prefill_s"), r.get("ttft_s"),
                 r.get("peak_gpu_mb"), r.get("acceptance_rate"), r.get("tokens_per_target_call"),
                 r.get("same_prefix_as_hf")]
        print("| " + r["name"] + " | " + " | ".join("-" if c is None else f"{c:.4g}" if isinstance(c, float)
                                                   else str(c) for c in cells) + " |")


def main() -> None:
    """Parse arguments, run one benchmark, print and save."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["llama8b", "builtin"])
    parser.add_argument("--tiny", action="store_true", help="llama8b flow on a tiny config (CPU check)")
    parser.add_argument("--source", default="builtin:smollm2-135m")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--hf-gen-len", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", default=[4])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--spec-only", action="store_true", help="builtin: only the speculative-decoding rows")
    parser.add_argument("--no-spec", action="store_true", help="skip speculative / assisted generation (llama8b)")
    parser.add_argument("--profile", action="store_true", help="GPU kernel time per decode step (bf16, W4)")
    parser.add_argument("--skip-bf16", action="store_true", help="only the baseline and the W4 sections")
    parser.add_argument("--kv-only", action="store_true", help="llama8b: only the bf16 and int8 KV-cache rows")
    parser.add_argument("--no-graph-w4", action="store_true", help="W4 and speculative runs without CUDA graphs")
    parser.add_argument("--budget-s", type=float, default=330.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    rows = run_llama8b(args) if args.what == "llama8b" else run_builtin(args)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"inference_{args.what}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1,
                                                                               default=str))
    print(json.dumps(env, default=str))
    if args.what == "llama8b":
        print_table(rows)


if __name__ == "__main__":
    main()
