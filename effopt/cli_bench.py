"""The `effopt bench` command (registered on the app in effopt/cli.py). Thin: check flags, call
effopt.bench.run_bench, print a Markdown report or JSON."""

from __future__ import annotations

import json
from typing import Optional

import typer

KV_CHOICES = ("bf16", "int8", "int4")


def bench(
    source: str = typer.Argument(..., help="Run directory (its model/ export or last checkpoint), exported "
                                           "folder, Hugging Face folder, .gguf, or builtin:NAME."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Reference model (default: SOURCE itself "
                                                                    "under plain transformers generate)."),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1, help="Prompt tokens (the longest prompt)."),
    gen_len: int = typer.Option(128, "--gen-len", min=2, help="New tokens per prompt."),
    batch: int = typer.Option(1, "--batch", min=1, help="Prompts decoded together (lengths differ)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="bf16 (the model's float dtype), int8 or "
                                                                    "int4; default: SOURCE's runtime setting."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft model for speculative decoding of the "
                                                              "baseline (or SOURCE), an EAGLE head's folder (or a run with one in "
                                                              "draft/); 'source' drafts with SOURCE."),
    k: int = typer.Option(4, "--k", min=1, help="Draft tokens per speculative round."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; > 0 samples (speculative "
                                                                          "sampling acceptance rule)."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and sampling."),
    ppl_tokens: int = typer.Option(2048, "--ppl-tokens", min=0, help="Persuasion tokens for the quantized KV "
                                                                     "cache's perplexity cost (0 = skip)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's; "
                                                                        "1 is fastest on a busy 2-core machine)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Also write the JSON result to this file."),
) -> None:
    """Measure inference (prefill, time to first token, decode tokens/s, peak memory, KV cache bytes,
    speculative decoding) against a baseline measured in the same process on the same prompts."""
    from effopt import log
    from effopt.cli import EXIT_INPUT, _fail
    from effopt.errors import InputError

    if kv_cache is not None and kv_cache not in KV_CHOICES:
        _fail(f"--kv-cache: expected one of {', '.join(KV_CHOICES)}, got {kv_cache!r}", EXIT_INPUT)
    if draft is not None and batch != 1:
        _fail("--draft: speculative decoding is measured at --batch 1", EXIT_INPUT)
    from effopt.bench import run_bench, to_markdown

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    try:
        result = run_bench(source, baseline, prompt_len, gen_len, batch, kv_cache, draft, k, temperature, seed,
                           ppl_tokens, device)
    except InputError as exc:
        _fail(str(exc), EXIT_INPUT)
    text = json.dumps(result, indent=2, default=str)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        log.info(f"wrote {output}")
    log.stdout(text if as_json else to_markdown(result))
