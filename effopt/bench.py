"""`effopt bench`: what a (compressed) model buys at inference, against a baseline in the same process.

One call loads SOURCE (and BASELINE, and a draft), builds the same prompts from the Persuasion
text with one seed, and measures, each under a peak-memory probe:
  * plain transformers `generate` on the baseline (the reference every ratio is taken against),
    and on SOURCE when it differs;
  * effopt's decode path on SOURCE (static KV cache; CUDA graph replay on CUDA), with the float
    cache and, when asked, the int8/int4 cache (its KV bytes, logit error and perplexity cost);
  * with a draft: speculative decoding of the target (baseline, or SOURCE without one) with effopt
    and with transformers' assisted generation (`assistant_model=`): acceptance rate, tokens per
    target call, speedup over plain decoding, and whether greedy output matched token for token.
The result is one JSON-able dict (`BENCH_FIELDS` lists its keys); `to_markdown` renders it.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

import torch

from effopt.errors import InputError
from effopt.generation.measure import RUN_FIELDS, common_prefix, effopt_run, hf_generate_run, speculative_run

BENCH_FIELDS = ("format", "date", "device", "environment", "settings", "runs", "speculative", "kv_cache")
RATIO_FIELDS = ("decode_speedup", "ttft_ratio", "peak_host_ratio", "kv_cache_ratio", "same_tokens_as_baseline")
SPEC_FIELDS = ("target", "draft", "k", "temperature", "acceptance_rate", "tokens_per_target_call",
               "decode_tokens_per_s", "plain_decode_tokens_per_s", "speedup", "identical_to_plain_greedy",
               "assisted")
KV_FIELDS = ("kind", "bytes_per_token", "float_bytes_per_token", "ratio", "logits_max_abs_err",
             "perplexity_float", "perplexity_kv", "perplexity_delta")


def resolve_source(source: str) -> str:
    """A run directory becomes its export (model/) or, failing that, its last checkpoint."""
    path = Path(source).expanduser()
    if not (path / "run.json").is_file():
        return source
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    record = json.loads((path / "run.json").read_text())
    done = [s["checkpoint"] for s in record.get("stages", []) if s.get("status") == "completed" and s.get("checkpoint")]
    if not done:
        raise InputError(f"{source}: run directory has neither model/ nor a completed checkpoint")
    return str(path / done[-1])


def load(source: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, runtime options) of a bench source."""
    from effopt.models import load_model, read_manifest

    resolved = resolve_source(source)
    model, tokenizer, _ = load_model(resolved, dtype, device)
    runtime = read_manifest(Path(resolved)).get("runtime", {}) if Path(resolved).is_dir() else {}
    return model, tokenizer, runtime


def make_prompts(tokenizer, vocab: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`batch` prompts cut from Persuasion at seeded offsets; row i is shorter by i * prompt_len / 2batch."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [max(1, prompt_len - i * (prompt_len // (2 * batch))) for i in range(batch)]
    if tokenizer is None:
        return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    from effopt.data import read_text

    text = read_text("builtin:austen/persuasion")[: 40 * prompt_len * batch + 20000]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    starts = torch.randint(0, max(1, len(ids) - prompt_len), (batch,), generator=gen).tolist()
    return [ids[s: s + n] for s, n in zip(starts, lengths)]


def _ratios(run: dict, base: dict) -> dict:
    def ratio(key):
        a, b = run.get(key), base.get(key)
        return a / b if a is not None and b else None

    same = [common_prefix(x, y) / max(len(y), 1) for x, y in zip(run["tokens"], base["tokens"])]
    return {"decode_speedup": ratio("decode_tokens_per_s"), "ttft_ratio": ratio("ttft_s"),
            "peak_host_ratio": ratio("peak_host_mb"), "kv_cache_ratio": ratio("kv_cache_bytes"),
            "same_tokens_as_baseline": min(same) if same else None}


def _row(name: str, model: str, run: dict, base: dict | None) -> dict:
    row = {"name": name, "model": model, **{k: run.get(k) for k in RUN_FIELDS}}
    row.update(_ratios(run, base or run))
    row["tokens"] = run["tokens"]
    return row


def _kv_section(model, tokenizer, prompts, kind: str, ppl_tokens: int, float_run: dict, kv_run: dict) -> dict:
    """Bytes, logit error of the last prompt position and perplexity cost of the quantized cache."""
    from effopt.generation.decode import prefill
    from effopt.generation.decoder import Decoder
    from effopt.nn.runtime import use_runtime

    dec = Decoder(model)
    n = len(prompts[0])
    with torch.inference_mode():
        ref = prefill(dec, dec.new_cache("bf16", 1, n + 1), prompts[0]).float()
        got = prefill(dec, dec.new_cache(kind, 1, n + 1), prompts[0]).float()
    out = {"kind": kind, "bytes_per_token": kv_run["kv_cache_bytes"] / max(_held(prompts, kv_run), 1),
           "float_bytes_per_token": float_run["kv_cache_bytes"] / max(_held(prompts, float_run), 1),
           "logits_max_abs_err": (got - ref).abs().max().item(), "perplexity_float": None, "perplexity_kv": None,
           "perplexity_delta": None}
    out["ratio"] = out["bytes_per_token"] / out["float_bytes_per_token"]
    if ppl_tokens and tokenizer is not None:
        windows = _ppl_windows(tokenizer, ppl_tokens)
        from effopt.metrics import perplexity

        out["perplexity_float"] = perplexity(model, windows)["perplexity"]
        with use_runtime(model, {"kv_cache": {"bits": int(kind[3:]), "granularity": "head_token"}}):
            out["perplexity_kv"] = perplexity(model, windows)["perplexity"]
        out["perplexity_delta"] = out["perplexity_kv"] - out["perplexity_float"]
    return out


def _held(prompts, run) -> int:
    return sum(len(p) + len(t) - 1 for p, t in zip(prompts, run["tokens"]))


def _ppl_windows(tokenizer, n_tokens: int, seq_len: int = 512) -> list[torch.Tensor]:
    from effopt.data import read_text

    text = read_text("builtin:austen/persuasion")[: n_tokens * 8]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:n_tokens])
    return [ids[i: i + seq_len] for i in range(0, len(ids) - 1, seq_len) if len(ids[i: i + seq_len]) >= 2]


def _device_name(model) -> str:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _environment() -> dict:
    import transformers

    import effopt

    return {"effopt": effopt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _speculative(target, draft, prompt, gen_len: int, k: int, temperature: float, seed: int, pad: int,
                 plain: dict, labels: tuple[str, str]) -> dict:
    """effopt speculative decoding and transformers' assisted generation against plain decoding."""
    from effopt.generation.sampling import Sampling
    from effopt.methods.distill.eagle import EagleHead

    spec = speculative_run(target, draft, prompt, gen_len, k, Sampling(temperature), "bf16", seed)
    greedy = temperature <= 0
    out = {"target": labels[0], "draft": labels[1], "k": k, "temperature": temperature,
           **{key: spec[key] for key in ("acceptance_rate", "tokens_per_target_call", "decode_tokens_per_s",
                                         "ttft_s", "total_s", "peak_host_mb", "peak_gpu_mb", "target_calls",
                                         "draft_calls")},
           "plain_decode_tokens_per_s": plain["decode_tokens_per_s"],
           "speedup": spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
           "identical_to_plain_greedy": (spec["tokens"][0] == plain["tokens"][0]) if greedy else None}
    out["assisted"] = None
    if greedy and not isinstance(draft, EagleHead):  # transformers' assistant must be a model
        hf_plain = hf_generate_run(target, [prompt], gen_len, pad)
        assisted = hf_generate_run(target, [prompt], gen_len, pad, assistant=draft)
        out["assisted"] = {"decode_tokens_per_s": assisted["decode_tokens_per_s"],
                           "plain_decode_tokens_per_s": hf_plain["decode_tokens_per_s"],
                           "speedup": assisted["decode_tokens_per_s"] / hf_plain["decode_tokens_per_s"],
                           "ttft_s": assisted["ttft_s"], "total_s": assisted["total_s"],
                           "identical_to_plain_greedy": assisted["tokens"] == hf_plain["tokens"]}
    return out


def load_draft(draft: str, target, device: str = "auto", dtype: str = "auto"):
    """A speculative draft: an EAGLE head bound to `target` when `draft` is a folder written by the
    distill stage's eagle method (or a run directory holding one in draft/), else a model source."""
    from effopt.methods.distill.eagle import is_eagle_folder, load_eagle

    for folder in (Path(draft), Path(draft) / "draft"):
        if is_eagle_folder(folder):
            return load_eagle(folder, target)
    return load(draft, device, dtype)[0]


def run_bench(source: str, baseline: str | None = None, prompt_len: int = 128, gen_len: int = 128,
              batch: int = 1, kv_cache: str | None = None, draft: str | None = None, k: int = 4,
              temperature: float = 0.0, seed: int = 0, ppl_tokens: int = 2048, device: str = "auto",
              dtype: str = "auto", models: dict | None = None) -> dict:
    """Measure SOURCE against BASELINE (default: SOURCE under plain transformers) in this process.

    Args:
        kv_cache: bf16 (the model's float dtype), int8 or int4; default: SOURCE's runtime setting.
        draft: a source for the draft model, an EAGLE head's folder (or a run holding one in draft/), or
            "source" to draft with SOURCE itself; speculative
            decoding then runs on the target = BASELINE (or SOURCE when there is none), batch 1.
        ppl_tokens: Persuasion tokens for the quantized cache's perplexity cost (0: skip).
        models: preloaded {"source"|"baseline"|"draft": model} (tests, scripts); tokenizer from SOURCE.
    """
    from effopt.generation.decode import default_cache_kind
    from effopt.generation.decoder import unsupported_reason
    from effopt.nn.runtime import use_runtime

    torch.manual_seed(seed)
    models = dict(models or {})
    tokenizer, runtime = models.pop("tokenizer", None), {}
    if "source" not in models:
        models["source"], tokenizer, runtime = load(source, device, dtype)
    model = models["source"]
    base = models.get("baseline") or (load(baseline, device, dtype)[0] if baseline and baseline != source else model)
    with use_runtime(model, runtime):
        kind = kv_cache or default_cache_kind(model)
    pad = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
    prompts = make_prompts(tokenizer, model.config.vocab_size, batch, prompt_len, seed)
    base_run = hf_generate_run(base, prompts, gen_len, pad)
    runs = [_row("transformers generate", "baseline", base_run, None)]
    if base is not model:
        runs.append(_row("transformers generate", "source", hf_generate_run(model, prompts, gen_len, pad), base_run))
    result = {"format": 1, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": _device_name(model), "environment": _environment(),
              "settings": {"source": source, "baseline": baseline or source, "draft": draft, "prompt_len": prompt_len,
                           "prompt_lens": [len(p) for p in prompts], "gen_len": gen_len, "batch": batch,
                           "kv_cache": kind, "seed": seed, "k": k, "temperature": temperature,
                           "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
              "runs": runs, "speculative": None, "kv_cache": None, "notes": []}
    reason = unsupported_reason(model)
    if reason:
        result["notes"].append(f"effopt decode path skipped: {reason}")
        return _strip(result)
    float_run = effopt_run(model, prompts, gen_len, "bf16")
    runs.append(_row("effopt decode, float KV", "source", float_run, base_run))
    if kind in ("int8", "int4"):
        kv_run = effopt_run(model, prompts, gen_len, kind)
        runs.append(_row(f"effopt decode, {kind} KV", "source", kv_run, base_run))
        result["kv_cache"] = _kv_section(model, tokenizer, prompts, kind, ppl_tokens, float_run, kv_run)
    if draft:
        target_label = "baseline" if base is not model else "source"
        dmodel = models.get("draft") or (model if draft == "source" else load_draft(draft, base, device, dtype))
        plain = float_run if base is model and batch == 1 else effopt_run(base, prompts[:1], gen_len, "bf16")
        result["speculative"] = _speculative(base, dmodel, prompts[0], gen_len, k, temperature, seed, pad, plain,
                                             (target_label, draft))
    return _strip(result)


def bench_metrics(model, tokenizer, prompt_len: int = 128, gen_len: int = 64, batch: int = 1,
                  runtime: dict | None = None, seed: int = 0) -> dict:
    """The bench as flat eval metrics: effopt's decode path (KV cache per `runtime`) against plain
    transformers `generate` on the same model and prompts (the eval stage's `bench` metric set)."""
    from effopt.generation.decode import default_cache_kind
    from effopt.generation.decoder import unsupported_reason
    from effopt.nn.runtime import use_runtime

    pad = (getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None) or 0
    prompts = make_prompts(tokenizer, model.config.vocab_size, batch, prompt_len, seed)
    hf = hf_generate_run(model, prompts, gen_len, pad)
    out = {"bench_hf_decode_tokens_per_s": hf["decode_tokens_per_s"], "bench_hf_ttft_s": hf["ttft_s"]}
    reason = unsupported_reason(model)
    if reason:
        out["bench_note"] = reason
        return out
    with use_runtime(model, runtime):
        kind = default_cache_kind(model)
    run = effopt_run(model, prompts, gen_len, kind)
    same = [common_prefix(a, b) / max(len(b), 1) for a, b in zip(run["tokens"], hf["tokens"])]
    out.update({f"bench_{k}": run[k] for k in ("prefill_s", "ttft_s", "decode_tokens_per_s", "kv_cache_bytes",
                                               "peak_host_mb", "peak_gpu_mb")})
    out.update({"bench_kv_cache": kind, "bench_decode_speedup": run["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
                "bench_same_tokens_as_hf": min(same)})
    return out


def _strip(result: dict) -> dict:
    """Drop token lists (kept only for the equality checks) from the report."""
    for row in result["runs"]:
        row.pop("tokens", None)
    return result


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def to_markdown(result: dict) -> str:
    """The bench result as Markdown tables (settings, runs, speculative decoding, KV cache)."""
    s = result["settings"]
    lines = [f"- date: {result['date']}", f"- device: {result['device']}",
             f"- source: `{s['source']}`, baseline: `{s['baseline']}`, draft: `{s['draft']}`",
             f"- prompt lengths {s['prompt_lens']}, {s['gen_len']} new tokens, batch {s['batch']}, "
             f"dtype {s['dtype']}, KV cache {s['kv_cache']}, seed {s['seed']}", ""]
    lines += ["| run | model | prefill s | TTFT s | decode tok/s | × baseline | peak host MB | peak GPU MB "
              "| KV cache bytes | same tokens as baseline |", "|" + "---|" * 10]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {r['model']} | {_fmt(r['prefill_s'])} | {_fmt(r['ttft_s'])} | "
                     f"{_fmt(r['decode_tokens_per_s'])} | {_fmt(r['decode_speedup'])} | "
                     f"{_fmt(r['peak_host_mb'], 4)} | {_fmt(r['peak_gpu_mb'], 4)} | {_fmt(r['kv_cache_bytes'])} | "
                     f"{_fmt(r['same_tokens_as_baseline'])} |")
    sp = result.get("speculative")
    if sp:
        lines += ["", f"Speculative decoding: target {sp['target']}, draft `{sp['draft']}`, k = {sp['k']}, "
                      f"temperature {sp['temperature']}", "",
                  "| method | decode tok/s | plain tok/s | speedup | acceptance | tokens / target call "
                  "| identical to plain greedy |", "|---|---|---|---|---|---|---|",
                  f"| effopt speculative | {_fmt(sp['decode_tokens_per_s'])} | {_fmt(sp['plain_decode_tokens_per_s'])} "
                  f"| {_fmt(sp['speedup'])} | {_fmt(sp['acceptance_rate'])} | {_fmt(sp['tokens_per_target_call'])} "
                  f"| {_fmt(sp['identical_to_plain_greedy'])} |"]
        a = sp.get("assisted")
        if a:
            lines.append(f"| transformers assisted generation | {_fmt(a['decode_tokens_per_s'])} | "
                         f"{_fmt(a['plain_decode_tokens_per_s'])} | {_fmt(a['speedup'])} | – | – | "
                         f"{_fmt(a['identical_to_plain_greedy'])} |")
    kv = result.get("kv_cache")
    if kv:
        lines += ["", "| KV cache | bytes / token | float bytes / token | ratio | max abs logit error "
                      "| ppl float | ppl quantized KV | Δ ppl |", "|---|---|---|---|---|---|---|---|",
                  f"| {kv['kind']} | {_fmt(kv['bytes_per_token'])} | {_fmt(kv['float_bytes_per_token'])} | "
                  f"{_fmt(kv['ratio'])} | {_fmt(kv['logits_max_abs_err'])} | {_fmt(kv['perplexity_float'], 5)} | "
                  f"{_fmt(kv['perplexity_kv'], 5)} | {_fmt(kv['perplexity_delta'])} |"]
    lines += [f"- note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"
