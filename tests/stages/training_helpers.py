"""Shared by the finetune / distill stage tests: a tiny recipe over the tiny model and its runner."""

from __future__ import annotations

from pathlib import Path

import torch

TRAIN = {"steps": 4, "batch_size": 2, "seq_len": 32, "log_every": 100}


def tiny_recipe(model_dir: Path, stages: list[dict], name: str = "tiny-train") -> dict:
    """load -> stages -> eval on builtin Austen text (byte tokenizer: short budgets)."""
    return {"name": name, "seed": 0,
            "data": {"train": {"source": "builtin:austen/emma", "max_tokens": 4096, "seq_len": 32},
                     "eval": {"source": "builtin:austen/persuasion", "max_tokens": 512, "seq_len": 128}},
            "stages": [{"stage": "load", "source": str(model_dir)}, *stages,
                       {"stage": "eval", "metrics": ["perplexity", "size"]}]}


def run(raw: dict, out: Path, resume: bool = False) -> dict:
    """Run a recipe (one intra-op thread: tiny models on a busy CPU) and return run.json."""
    from effopt import log
    from effopt.pipeline import run_recipe
    from effopt.recipe import parse_recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    log.set_quiet(True)
    try:
        return run_recipe(parse_recipe(raw), out, resume=resume)
    finally:
        log.set_quiet(False)
        torch.set_num_threads(threads)
